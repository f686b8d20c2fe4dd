"""Trainer: resume after SIGKILL equals an uninterrupted run, early stop, dims checked first, it learns."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.cli import main as cli_main
from models.config import ConfigError, load_preset
from models.mamfusion import MamFusion
from storage.annotations import AnnotationSet, QueryRecord
from storage.feature_store import FeatureStore
from storage.registry import RunDir
from storage.synthetic import SyntheticConfig, SyntheticPRVR, make_synthetic_benchmark, write_to_store
from tasks import train as train_module
from tasks.data import DataError, load_split
from tasks.device import resolve_device
from tasks.evaluate import evaluate
from tasks.train import (
    ResumeMismatchError,
    TrainingDivergedError,
    TrainRequest,
    _rng_state,
    _set_rng_state,
    amp_enabled,
    select_splits,
    train,
    train_run,
)

REPO = Path(__file__).resolve().parents[1]
RECALL_KEYS = ("r1", "r5", "r10", "r100", "sumr")
TINY = {
    "visual_dim": 64,
    "query_dim": 48,
    "hidden_size": 16,
    "n_heads": 2,
    "max_ctx_l": 48,
    "batch_size": 16,
    "lr": 1e-3,
    "num_workers": 0,
}


def write_jsonl_annotations(synth: SyntheticPRVR, path: Path) -> Path:
    """Our own annotation format (video_id, start, end, caption, split, query_id), one query per line."""
    with open(path, "w") as f:
        for q in synth.queries:
            row = {"video_id": q.video_id, "start": q.start, "end": q.end, "caption": q.text}
            f.write(json.dumps(row | {"split": q.split, "query_id": q.query_id}) + "\n")
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: one intra-op thread avoids oversubscription (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small synthetic benchmark in an on-disk store, plus its annotation file."""
    root = tmp_path_factory.mktemp("synthetic")
    synth = make_synthetic_benchmark(SyntheticConfig(n_videos=60, max_rows=32, seed=1))
    store = FeatureStore(root / "store")
    fps = write_to_store(synth, store)
    return synth, store, fps, write_jsonl_annotations(synth, root / "annotations.jsonl")


def _splits(bench, *names):
    synth, store, fps, _ = bench
    ann = synth.annotation_set()
    return [load_split(store, ann, name, *fps) for name in names]


def _cli_train(bench, out: Path, overrides: dict) -> subprocess.Popen:
    _, store, _, annotations = bench
    sets = [f"{k}={v}" for k, v in overrides.items()]
    cmd = [sys.executable, "-m", "flows.cli", "train", "--preset", "demo", "--store", store.url]
    cmd += ["--annotations", str(annotations), "--out", str(out), "--json"]
    cmd += [arg for s in sets for arg in ("--set", s)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out)


def _history(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # drop wall times


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(bench, tmp_path, capsys):
    overrides = TINY | {"n_epoch": 3, "hard_negative_start_epoch": 1, "num_workers": 1}
    full = _finish(_cli_train(bench, tmp_path / "full", overrides))

    killed = tmp_path / "killed"
    proc = _cli_train(bench, killed, overrides)
    deadline = time.monotonic() + 240
    while not (killed / "history.jsonl").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(RunDir(killed).checkpoint_file, weights_only=True)["state"]
    assert 1 <= state["epoch"] < 3, "the run must be killed part-way"

    resumed = _cli_train(bench, killed, overrides)
    metrics = _finish(resumed)
    assert metrics == full
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(killed) == _history(tmp_path / "full")
    for name in ("config.json", "features.json", "report.md", "eval/per_query.jsonl", "plots/val_recall.png"):
        assert (killed / name).is_file(), name
    # `mamfusion evaluate --split test` on the finished run reproduces the test metrics the run reported
    assert cli_main(["evaluate", "--model", str(killed), "--split", "test", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in RECALL_KEYS} == pytest.approx({k: metrics[k] for k in RECALL_KEYS})


def test_select_splits():
    q = [
        QueryRecord(f"v{i}#enc#0", f"v{i}", f"t{i}", None, None, s)
        for i, s in enumerate(["train", "val", "test"])
    ]
    own = select_splits(AnnotationSet(q), None)
    assert [x.queries for x in (own.train, own.val, own.test)] == [
        [q[0]],
        [q[1]],
        [q[2]],
    ] and own.test_name == "test"
    plain = AnnotationSet([QueryRecord("a#enc#0", "a", "t", None, None, None)])
    val_file = AnnotationSet([QueryRecord("b#enc#0", "b", "u", None, None, None)])
    mssl = select_splits(plain, val_file)  # MS-SL: a train caption file and a val caption file
    assert (mssl.train, mssl.val, mssl.test, mssl.test_name) == (plain, val_file, val_file, "val")
    with pytest.raises(DataError, match=r"need \['train', 'val'\]; pass --val-annotations"):
        select_splits(AnnotationSet(q[:1]), None)
    with pytest.raises(DataError, match=r"have splits \['test', 'val'\], need \['train'\]"):
        select_splits(AnnotationSet(q[1:]), val_file)  # no silent training on val/test queries


def test_rng_state_roundtrip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = _rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    _set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_dimension_mismatch_fails_before_training(bench, tmp_path):
    train_data, val_data = _splits(bench, "train", "val")
    cfg = load_preset("demo", TINY | {"visual_dim": 1280})
    with pytest.raises(DataError, match=r"visual features .* are 64-d .* visual_dim=1280"):
        train(cfg, train_data, val_data, RunDir(tmp_path / "run"), progress=False)
    assert not RunDir(tmp_path / "run").checkpoint_file.exists()

    proc = _cli_train(bench, tmp_path / "cli", TINY | {"query_dim": 384})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert "text features" in err and "48-d" in err and "query_dim=384" in err
    assert not (tmp_path / "cli" / "checkpoints").exists()


def test_annotation_format_is_honoured_and_a_wrong_one_is_explained(bench, tmp_path, capsys):
    _, store, _, annotations = bench
    argv = ["train", "--preset", "demo", "--store", store.url, "--annotations", str(annotations)]
    argv += ["--out", str(tmp_path / "run"), *(a for k, v in TINY.items() for a in ("--set", f"{k}={v}"))]
    assert cli_main([*argv, "--format", "charades"]) == 2
    err = capsys.readouterr().err
    assert (
        "annotations.jsonl: no caption could be read as charades (120 malformed lines skipped; first: line 1:"
        in err
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_early_stopping_and_history(bench, tmp_path):
    train_data, val_data = _splits(bench, "train", "val")
    # A zero-ish learning rate cannot improve val SumR after epoch 1, so patience 1 stops after epoch 3.
    cfg = load_preset("demo", TINY | {"lr": 1e-12, "n_epoch": 10, "max_es_cnt": 1})
    result = train(cfg, train_data, val_data, RunDir(tmp_path), progress=False)
    assert (result.epochs_run, result.stopped_early, result.best_epoch) == (3, True, 1)
    history = _history(tmp_path)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["best"] for h in history] == [True, False, False]
    assert set(history[0]["train"]) >= {"total", "clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl"}
    assert {"r1", "r5", "r10", "r100", "sumr"} <= set(history[0]["val"])
    again = train(
        cfg, train_data, val_data, RunDir(tmp_path), progress=False
    )  # resuming a finished run: nothing to do
    assert (again.epochs_run, again.best_epoch) == (3, 1)


@pytest.mark.slow
def test_full_model_learns_far_above_untrained(tmp_path):
    """Test SumR after a short CPU training vs the same architecture untrained (chance level)."""
    synth = make_synthetic_benchmark(SyntheticConfig(n_videos=240, max_rows=48, seed=3))
    store = FeatureStore(f"memory://{tmp_path.name}")
    fps = write_to_store(synth, store)
    ann = synth.annotation_set()
    train_data, val_data, test_data = (load_split(store, ann, s, *fps) for s in ("train", "val", "test"))
    cfg = load_preset("demo", TINY | {"hidden_size": 32, "n_epoch": 5, "batch_size": 32})
    torch.manual_seed(0)
    untrained = evaluate(MamFusion(cfg.model), test_data, details=False).metrics
    result = train(cfg, train_data, val_data, RunDir(tmp_path / "run"), progress=False)
    trained = evaluate(MamFusion.from_pretrained(tmp_path / "run"), test_data, details=False).metrics
    assert untrained.sumr < untrained.chance.sumr + 40, untrained
    assert trained.sumr > untrained.sumr + 100, (trained, untrained)
    assert trained.r1 > 5 * trained.chance.r1, trained
    assert result.best_sumr > 0


def test_device_and_amp_choice():
    cpu = load_preset("demo", {"device": "cpu"}).train
    assert resolve_device(cpu.device) == torch.device("cpu") and not amp_enabled(cpu, torch.device("cpu"))
    assert amp_enabled(load_preset("demo").train, torch.device("cuda"))  # bf16 autocast by default on CUDA
    assert not amp_enabled(load_preset("demo", {"amp": "off"}).train, torch.device("cuda"))
    with pytest.raises(ConfigError, match="amp=on needs CUDA"):
        amp_enabled(load_preset("demo", {"amp": "on"}).train, torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device(load_preset("demo").train.device) == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(load_preset("demo", {"device": "cuda"}).train.device, "train.device")


def test_resume_with_a_changed_config_is_refused_naming_the_field(bench, tmp_path, capsys):
    train_data, val_data = _splits(bench, "train", "val")
    run = RunDir(tmp_path / "run")
    train(load_preset("demo", TINY | {"n_epoch": 1}), train_data, val_data, run, progress=False)
    recorded = run.read_experiment()
    changed = load_preset("demo", TINY | {"n_epoch": 1, "lr": 1e-2})
    with pytest.raises(ResumeMismatchError, match=r"train\.lr: 0\.001 -> 0\.01.*--no-resume"):
        train(changed, train_data, val_data, run, progress=False)
    assert run.read_experiment() == recorded  # the record still describes what was run
    # speed-only settings may change on resume
    train(
        load_preset("demo", TINY | {"n_epoch": 1, "eval_query_bsz": 7}),
        train_data,
        val_data,
        run,
        progress=False,
    )
    # other data: refused too
    with pytest.raises(ResumeMismatchError, match="data: the training/validation videos or captions changed"):
        train(load_preset("demo", TINY | {"n_epoch": 1}), val_data, val_data, run, progress=False)
    # through the CLI: one line, exit 2
    _, store, _, annotations = bench
    argv = ["train", "--preset", "demo", "--store", store.url, "--annotations", str(annotations)]
    argv += ["--out", str(run.path), *(a for k, v in TINY.items() for a in ("--set", f"{k}={v}"))]
    assert cli_main([*argv, "--set", "n_epoch=1", "--set", "lr=0.02"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.02" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("lr=inf", "train.lr"),
        ("lr=nan", "train.lr"),
        ("lr=1000", "train.lr"),
        ("batch_size=99999999999999999999999", "train.batch_size"),
    ],
)
def test_absurd_hyper_parameters_fail_validation(bench, tmp_path, capsys, override, field):
    _, store, _, annotations = bench
    argv = ["train", "--preset", "demo", "--store", store.url, "--annotations", str(annotations)]
    assert cli_main([*argv, "--out", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_divergence_stops_training_naming_epoch_and_step(bench, tmp_path, monkeypatch):
    """Weights that turn non-finite (as lr=inf or lr=1000 did) stop the run; no NaN model is written."""
    train_data, val_data = _splits(bench, "train", "val")
    real = train_module.build_training

    def poisoned(*args, **kwargs):
        model, *rest = real(*args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("inf"))
        return (model, *rest)

    monkeypatch.setattr(train_module, "build_training", poisoned)
    run = RunDir(tmp_path / "run")
    with pytest.raises(TrainingDivergedError, match="epoch 1, step 1"):
        train(load_preset("demo", TINY | {"n_epoch": 2}), train_data, val_data, run, progress=False)
    assert not run.weights_file.exists()


@pytest.mark.slow
def test_small_validation_is_ranked_against_distractors_and_selects_a_later_epoch(tmp_path):
    """30 videos (4-5 in val): validation ranks val queries against val + train videos, so the score moves
    and the selected epoch is not stuck at 1; the split-only gallery is reported as too small."""
    synth = make_synthetic_benchmark(SyntheticConfig(n_videos=30, max_rows=32, seed=5))
    store = FeatureStore(tmp_path / "store")
    write_to_store(synth, store)
    annotations = write_jsonl_annotations(synth, tmp_path / "annotations.jsonl")
    cfg = load_preset("demo", TINY | {"n_epoch": 12, "hard_negative_start_epoch": 100})
    request = TrainRequest(
        config=cfg, store=str(tmp_path / "store"), annotations=str(annotations), run_dir=str(tmp_path / "run")
    )
    metrics = train_run(request, progress=False)
    history = RunDir(tmp_path / "run").read_history()
    n_val = len(synth.annotation_set().split("val").video_ids())
    assert history[0]["val"]["gallery"] == "extended"
    assert history[0]["val"]["n_videos"] == n_val + history[0]["val"]["n_distractors"] >= 25
    assert len({(h["val"]["sumr"], h["val"]["meanr"]) for h in history}) > 3  # it discriminates epochs
    assert metrics.training.best_epoch > 1
    assert metrics.gallery == "extended" and metrics.n_videos >= 25
