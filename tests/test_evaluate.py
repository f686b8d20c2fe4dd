"""Chunked evaluation equals a brute-force full score matrix; per-query moments; the `evaluate` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flows.cli import main as cli_main
from models.config import load_preset
from models.mamfusion import MamFusion
from models.preprocess import clip_spans
from storage.annotations import write_mssl_captions
from storage.feature_store import FeatureStore
from storage.registry import ExtractorSnapshot, FeatureSource, RunDir
from storage.synthetic import SyntheticConfig, make_synthetic_benchmark, write_to_store
from tasks.data import load_split
from tasks.evaluate import NonFiniteScoreError, encode_gallery, encode_queries, evaluate, gallery_distractors

CFG = load_preset(
    "demo",
    {"visual_dim": 64, "query_dim": 48, "hidden_size": 16, "n_heads": 2, "max_ctx_l": 48, "n_epoch": 1},
)


@pytest.fixture(scope="module")
def setup():
    synth = make_synthetic_benchmark(SyntheticConfig(n_videos=30, max_rows=48, seed=7))
    store = FeatureStore("memory://test_evaluate_store")
    fps = write_to_store(synth, store)
    data = load_split(store, synth.annotation_set(), None, *fps)
    torch.manual_seed(0)
    return synth, store, fps, data, MamFusion(CFG.model).eval()


def _brute_force(model, data):
    """Full (Q, V) score matrix in one call, ranks by sorting each row (an independent path)."""
    with torch.inference_mode():
        scores = model.score(encode_queries(model, data, 1000), encode_gallery(model, data, 1000))
    order = scores.argsort(dim=1, descending=True)
    ranks = [int((order[i] == v).nonzero()) + 1 for i, v in enumerate(data.query_video)]
    return scores, order, ranks


@pytest.mark.parametrize(("query_bsz", "gallery_chunk"), [(1, 1), (7, 4), (50, 2048)])
def test_chunked_ranks_equal_brute_force(setup, query_bsz, gallery_chunk):
    *_, data, model = setup
    # one encoding batch for everything, so the gallery embeddings match the brute-force ones exactly
    result = evaluate(model, data, query_bsz=query_bsz, context_bsz=1000, gallery_chunk=gallery_chunk)
    scores, order, ranks = _brute_force(model, data)
    assert result.ranks.tolist() == ranks
    assert len(set(ranks)) > 5  # ranks vary widely, so the comparison is not vacuous
    for i, rec in enumerate(result.per_query):
        assert rec["top_video_ids"] == [data.video_ids[j] for j in order[i, :10].tolist()]
        assert rec["top_scores"] == pytest.approx(scores[i, order[i, :10]].tolist(), abs=1e-5)
    m = result.metrics
    assert m.r1 == pytest.approx(100 * sum(r <= 1 for r in ranks) / len(ranks))
    assert m.n_videos == len(data.video_ids) == 30 and m.gallery == "split"
    assert m.chance.r1 == pytest.approx(100 / 30)


def test_best_clip_is_the_argmax_moment_of_the_correct_video(setup):
    *_, data, model = setup
    result = evaluate(model, data, context_bsz=1000)
    with torch.inference_mode():
        q = F.normalize(encode_queries(model, data, 1000), dim=-1)
        clips = F.normalize(encode_gallery(model, data, 1000).clips, dim=-1)
    for i, rec in enumerate(result.per_query):
        v = data.query_video[i]
        want = int((clips[v] @ q[i]).argmax())
        span = clip_spans(data.video_times[v], CFG.model.map_size)[want].tolist()
        assert rec["best_clip"] == {
            "video_id": data.video_ids[v],
            "clip": want,
            "start": span[0],
            "end": span[1],
        }
        assert rec["video_id"] == data.video_ids[v] and rec["text"] == data.queries[i].text


def _write_run(run_dir, model, store, fps, annotations) -> RunDir:
    run = RunDir(run_dir).create()
    model.save_pretrained(run.path)
    run.write_experiment(CFG)
    snap = {fp: ExtractorSnapshot(fingerprint=fp, **store.extractor_info(fp)) for fp in fps}
    run.write_features(
        FeatureSource(
            store=store.url,
            visual=snap[fps[0]],
            text=snap[fps[1]],
            annotations=str(annotations),
            data_digest="test",
        )
    )
    return run


def test_evaluate_command_on_a_caption_file(setup, tmp_path, capsys):
    synth, store, fps, data, model = setup
    captions = tmp_path / "test.caption.txt"
    write_mssl_captions(captions, synth.queries)
    run = _write_run(tmp_path / "run", model, store, fps, captions)
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(run.path), "--captions", str(captions), "--json", "--out", str(out)]
    assert cli_main(args) == 0
    got = json.loads(capsys.readouterr().out)
    want = evaluate(model, data, details=False).metrics
    assert got["split"] == "test.caption"
    assert got["n_videos"] == 30 and got["chance"]["r1"] == pytest.approx(100 / 30)
    assert {k: got[k] for k in ("r1", "r5", "r10", "r100", "sumr")} == pytest.approx(
        {k: getattr(want, k) for k in ("r1", "r5", "r10", "r100", "sumr")}
    )
    rows = (out / "per_query.jsonl").read_text().splitlines()
    assert len(rows) == len(synth.queries)
    assert not (run.path / "eval").exists()  # evaluation never writes into the model folder

    # the MS-SL caption file has no split field, so --split test is refused with a clear message
    assert cli_main(["evaluate", "--model", str(run.path), "--split", "test"]) == 2
    assert "has no split 'test'" in capsys.readouterr().err


def test_extended_gallery_ranks_equal_brute_force_over_all_videos(setup):
    """A split's queries against its videos + every other video: the same ranks as one full score matrix."""
    synth, store, fps, full, model = setup
    ann = synth.annotation_set()
    test = ann.split("test")
    distractors = gallery_distractors(test, ann, "auto", "csv")
    assert len(distractors) == 30 - len(test.video_ids()) > 0
    assert gallery_distractors(test, ann, "auto", "mssl") == []  # benchmark data keeps the protocol
    assert gallery_distractors(test, ann, "split", "csv") == []
    data = load_split(store, test, None, *fps, name="test", distractors=distractors)
    assert data.n_distractors == len(distractors) and len(data.video_ids) == 30
    result = evaluate(model, data, context_bsz=1000)
    # brute force: score every test query against the full 30-video gallery in one matrix
    with torch.inference_mode():
        scores = model.score(encode_queries(model, data, 1000), encode_gallery(model, full, 1000))
    order = scores.argsort(dim=1, descending=True)
    want = [
        int((order[i] == full.video_ids.index(q.video_id)).nonzero()) + 1 for i, q in enumerate(data.queries)
    ]
    assert result.ranks.tolist() == want
    m = result.metrics
    assert (m.gallery, m.n_videos, m.n_distractors) == ("extended", 30, len(distractors))
    own = load_split(store, test, None, *fps, name="test")
    small = evaluate(model, own, context_bsz=1000).metrics
    assert small.n_videos == len(test.video_ids()) and small.chance.r1 > m.chance.r1


def test_non_finite_embeddings_are_refused_naming_them(setup):
    *_, data, model = setup
    broken = MamFusion(CFG.model).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteScoreError, match=f"30 of 30 videos .*{data.video_ids[0]}"):
        evaluate(broken, data, context_bsz=1000)


def test_a_nan_filled_stored_video_is_skipped_not_ranked_first(tmp_path):
    """A stored video of NaN (written around the writer's checks, e.g. by older code) is refused when read."""
    from storage import _zarr_entries as entries

    synth = make_synthetic_benchmark(SyntheticConfig(n_videos=12, max_rows=24, seed=3))
    store = FeatureStore(tmp_path / "store")
    fps = write_to_store(synth, store)
    victim = synth.annotation_set().video_ids()[0]
    sha = store.resolve_video_ids(fps[0], [victim])[victim]
    old = store.read_video(sha, fps[0])
    spec = entries.ArraySpec("features", (old.features.shape[1],), "float32", ("row", "dim"))
    times = entries.ArraySpec("times", (2,), "float64", ("row", "bound"))
    nan = np.full_like(old.features, np.nan)

    async def overwrite() -> None:
        arrays = {"features": (nan, spec), "times": (old.times, times)}
        stage = await entries.stage_entry(store._store, "videos", fps[0], sha, arrays)
        meta = {"n_rows": len(nan), "video_id": victim, "written_at": "x", "attrs": {}}
        await entries.commit_entry(store._store, "videos", fps[0], sha, stage, meta)

    store._run(overwrite())
    assert np.isnan(FeatureStore(tmp_path / "store").read_video(sha, fps[0]).features).all()
    data = load_split(FeatureStore(tmp_path / "store"), synth.annotation_set(), None, *fps)
    assert victim not in data.video_ids
    assert any(s.id == victim and "not finite" in s.reason for s in data.skipped)
    assert all(q.video_id != victim for q in data.queries)


def test_evaluation_writes_nothing_and_a_missing_store_is_an_error(tmp_path, capsys):
    synth = make_synthetic_benchmark(SyntheticConfig(n_videos=12, max_rows=24, seed=4))
    store = FeatureStore(tmp_path / "store")
    fps = write_to_store(synth, store)
    annotations = tmp_path / "captions.txt"
    write_mssl_captions(annotations, synth.queries)
    torch.manual_seed(0)
    run = _write_run(tmp_path / "model", MamFusion(CFG.model), store, fps, annotations)
    state = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert cli_main(["evaluate", "--model", str(run.path), "--captions", str(annotations)]) == 0
    assert "12 videos" in capsys.readouterr().out
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == state  # neither the model folder nor the store was written to
    typo = tmp_path / "stroe"
    argv = ["evaluate", "--model", str(run.path), "--captions", str(annotations), "--store", str(typo)]
    assert cli_main(argv) == 2
    assert str(typo) in capsys.readouterr().err and not typo.exists()
