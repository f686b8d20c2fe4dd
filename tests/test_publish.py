"""Champion/challenger publishing: the registry's versions and `current`, the lock, identical challengers."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.config import load_preset
from storage.registry import (
    ExtractorSnapshot,
    FeatureSource,
    ModelDir,
    ModelRegistry,
    RecallTable,
    RegistryError,
    RetrievalMetrics,
    RunDir,
    new_version,
    resolve_model_dir,
)
from tasks.publish import decide, publish

REPO = Path(__file__).resolve().parents[1]


def metrics(sumr: float, split: str = "test", n_videos: int = 30) -> RetrievalMetrics:
    r = sumr / 4
    table = RecallTable(r1=r, r5=r, r10=r, r100=r, sumr=sumr)
    chance = RecallTable(r1=3.3, r5=16.7, r10=33.3, r100=100.0, sumr=153.3)
    return RetrievalMetrics(
        split=split,
        gallery="split",
        n_videos=n_videos,
        n_queries=18,
        **table.model_dump(),
        medr=3.0,
        meanr=4.0,
        chance=chance,
        chance_medr=16.0,
        trivial_ks=[100],
    )


def make_run(root: Path, name: str, *, data: str | None = None, lr: float = 5e-5) -> RunDir:
    """A run directory with every file a real one has (weights are stand-in bytes)."""
    run = RunDir(root / "runs" / name).create()
    run.checkpoint_file.parent.mkdir()
    run.checkpoint_file.write_bytes(b"optimizer state")
    run.config_file.write_text("{}")
    run.weights_file.write_bytes(name.encode())
    run.write_experiment(load_preset("demo", {"lr": lr}))
    snap = ExtractorSnapshot(fingerprint="fp", kind="text", dim=4, config={})
    visual = ExtractorSnapshot(fingerprint="vfp", kind="visual", dim=4, config={})
    run.write_features(FeatureSource(store="s", visual=visual, text=snap, data_digest=data or name))
    run.report_file.write_text(f"# run {name}\n")
    return run


def fixed(value: RetrievalMetrics | None):
    def evaluate(model: ModelDir) -> RetrievalMetrics:
        assert value is not None, "no champion should have been evaluated"
        return value

    return evaluate


def test_decide_promotes_first_model_and_strictly_better_ones_only():
    assert decide(metrics(100.0), None) == (True, "no current model yet")
    assert decide(metrics(251.0), metrics(250.0))[0] is True
    tie, reason = decide(metrics(250.0), metrics(250.0))
    assert tie is False and "only a strictly better model replaces it" in reason
    promoted, reason = decide(metrics(249.5), metrics(250.0))
    assert promoted is False
    assert "249.50 <= current model's 250.00" in reason and "18 queries vs a gallery of 30 videos" in reason


def test_first_publish_becomes_current_without_the_checkpoint(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    outcome = publish(make_run(tmp_path, "a"), registry, "v1", metrics(300.0), fixed(None))
    assert outcome.published and outcome.promoted and outcome.current == "v1"
    assert registry.current_version() == "v1"
    assert registry.current_file.read_text() == "v1\n"
    model = registry.model("v1")
    assert model.weights_file.read_bytes() == b"a"
    assert not (model.path / "checkpoints").exists()
    record = model.read_publish()
    assert record is not None and record.promoted and record.gallery.startswith("split test: 18 queries")
    assert "v1 is now the current model" in model.report_file.read_text()


def test_worse_or_equal_challenger_is_kept_as_candidate(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    publish(make_run(tmp_path, "a"), registry, "v1", metrics(300.0), fixed(None))
    outcome = publish(make_run(tmp_path, "b"), registry, "v2", metrics(305.0), fixed(metrics(310.0)))
    assert not outcome.promoted and outcome.current == "v1"
    assert outcome.record is not None and outcome.record.champion_sumr == 310.0
    assert registry.current_version() == "v1"
    assert registry.model("v2").weights_file.read_bytes() == b"b"  # published as a candidate all the same
    report = registry.model("v2").report_file.read_text()
    assert (
        "v2 was kept as a candidate; v1 stays current" in report
        and "305.00 <= current model's 310.00" in report
    )
    tie = publish(make_run(tmp_path, "c"), registry, "v3", metrics(310.0), fixed(metrics(310.0)))
    assert not tie.promoted and registry.current_version() == "v1"


def test_better_challenger_moves_current(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    publish(make_run(tmp_path, "a"), registry, "v1", metrics(300.0), fixed(None))
    outcome = publish(make_run(tmp_path, "b"), registry, "v2", metrics(320.0), fixed(metrics(300.0)))
    assert outcome.promoted and registry.current_version() == "v2"


def test_identical_challenger_publishes_nothing(tmp_path):
    """Same config on the same data (a fully cached re-run): no new version, no evaluation, current kept."""
    registry = ModelRegistry(tmp_path / "models")
    publish(make_run(tmp_path, "a", data="d1"), registry, "v1", metrics(300.0), fixed(None))
    again = publish(make_run(tmp_path, "a2", data="d1"), registry, "v2", metrics(300.0), fixed(None))
    assert not again.published and again.version is None and again.current == "v1"
    assert "identical to the current model v1" in again.reason
    assert registry.versions() == ["v1"]
    # another learning rate on the same data is a different challenger
    other = make_run(tmp_path, "b", data="d1", lr=1e-4)
    assert publish(other, registry, "v2", metrics(290.0), fixed(metrics(300.0))).published


def test_versions_are_never_overwritten(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    publish(make_run(tmp_path, "a"), registry, "v1", metrics(300.0), fixed(None))
    with pytest.raises(RegistryError, match="never overwritten"):
        publish(make_run(tmp_path, "b"), registry, "v1", metrics(400.0), fixed(metrics(300.0)))
    assert registry.model("v1").weights_file.read_bytes() == b"a"


@pytest.mark.parametrize("pointer", ["../../../../etc", "/etc", "", ".", "..", "v1/../v1", "ghost", "a b"])
def test_current_pointer_must_name_a_version_inside_the_models_folder(tmp_path, pointer):
    registry = ModelRegistry(tmp_path / "models")
    publish(make_run(tmp_path, "a"), registry, "v1", metrics(300.0), fixed(None))
    (tmp_path / "etc").mkdir()
    registry.current_file.write_text(pointer + "\n")
    with pytest.raises(RegistryError, match="not a version name|no version"):
        registry.current()
    with pytest.raises(RegistryError):
        resolve_model_dir(tmp_path / "models")
    with pytest.raises(RegistryError):
        registry.set_current(pointer)


def test_resolve_model_dir_accepts_version_models_and_output_folders(tmp_path):
    registry = ModelRegistry(tmp_path / "out" / "models")
    publish(make_run(tmp_path, "a"), registry, "v1", metrics(300.0), fixed(None))
    want = registry.model("v1")
    for folder in (want.path, registry.path, tmp_path / "out"):
        assert resolve_model_dir(folder) == want
    with pytest.raises(RegistryError, match="not a model"):
        resolve_model_dir(tmp_path / "runs")
    with pytest.raises(RegistryError, match="no such model folder"):
        resolve_model_dir(tmp_path / "missing")


def test_records_are_validated_on_read(tmp_path):
    run = make_run(tmp_path, "a")
    run.features_file.write_text(json.dumps({"store": "s", "visual_fingerprint": "v"}))
    with pytest.raises(
        RegistryError, match=r"features.json: not a valid FeatureSource record .*schema_version|visual"
    ):
        run.read_features()
    run.features_file.unlink()
    with pytest.raises(RegistryError, match="missing; it names the features"):
        run.read_features()


def test_model_file_names_match_the_model_class():
    from models import mamfusion
    from storage import registry

    assert (registry.CONFIG_FILE, registry.WEIGHTS_FILE) == (mamfusion.CONFIG_FILE, mamfusion.WEIGHTS_FILE)


def test_versions_sort_by_time_and_carry_the_run_id():
    early = new_version("0a38502d-1111-2222", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    late = new_version("ffff0000-1111-2222", dt.datetime(2026, 1, 2, 3, 4, 6, tzinfo=dt.UTC))
    assert early == "20260102-030405-0a38502d"
    assert early < late


_PUBLISHER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_publish import make_run, metrics
from storage.registry import ModelRegistry
from tasks.publish import publish

root, name, sumr, go = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
run = make_run(root, name)
while not go.exists():
    time.sleep(0.01)

def evaluate_champion(model):
    time.sleep(0.5)  # a slow champion evaluation: the window in which an unlocked publish raced
    return metrics({{"a": 380.0, "b": 300.0}}[model.read_features().data_digest])

publish(run, ModelRegistry(root / "models"), "v-" + name, metrics(sumr), evaluate_champion)
"""


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_two_processes_publishing_at_once_leave_the_better_model_current(tmp_path, order):
    script = _PUBLISHER.format(tests=str(REPO / "tests"))
    go = tmp_path / "go"
    sumr = {"a": 380.0, "b": 300.0}
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), n, str(sumr[n]), str(go)], env=env)
        for n in order
    ]
    time.sleep(3)  # both have imported everything and wait for the same instant
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    registry = ModelRegistry(tmp_path / "models")
    assert registry.current_version() == "v-a"
    a, b = (registry.model(v).read_publish() for v in ("v-a", "v-b"))
    assert a is not None and b is not None and registry.versions() == ["v-a", "v-b"]
    # whichever went first saw no champion; the second compared against the first: both records are true
    if a.champion_version is None:
        assert a.promoted and not b.promoted and (b.champion_version, b.current) == ("v-a", "v-a")
    else:
        assert b.promoted and b.champion_version is None
        assert a.promoted and (a.champion_version, a.champion_sumr) == ("v-b", 300.0)


def test_model_fingerprint_follows_file_bytes(tmp_path):
    first = make_run(tmp_path / "a", "m").fingerprint()
    again = make_run(tmp_path / "b", "m")  # same bytes elsewhere: same model
    assert again.fingerprint() == first
    for name, data in (("model.pt", b"retrained"), ("config.json", b'{"a": 1}'), ("features.json", b"{}")):
        other = make_run(tmp_path / f"changed-{name}", "m")
        (other.path / name).write_bytes(data)
        assert other.fingerprint() != first, name
    (again.path / "model.pt").unlink()
    with pytest.raises(RegistryError, match="model.pt: missing"):
        again.fingerprint()
