"""Chunked evaluation equals a brute-force full score matrix; per-query moments; the `evaluate` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flows.cli import main as cli_main
from models.config import load_preset
from models.mamfusion import MamFusion
from models.preprocess import clip_spans
from storage.annotations import write_mssl_captions
from storage.feature_store import FeatureStore
from storage.synthetic import SyntheticConfig, make_synthetic_benchmark, write_to_store
from tasks.data import load_split
from tasks.evaluate import encode_gallery, encode_queries, evaluate
from tasks.train import EXPERIMENT, FEATURES_FILE

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
    assert m["r1"] == pytest.approx(100 * sum(r <= 1 for r in ranks) / len(ranks))
    assert m["n_videos"] == len(data.video_ids) == 30


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


def test_evaluate_command_on_a_caption_file(setup, tmp_path, capsys):
    synth, store, fps, data, model = setup
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / EXPERIMENT).write_text(CFG.model_dump_json())
    captions = tmp_path / "test.caption.txt"
    write_mssl_captions(captions, synth.queries)
    features = {"store": store.url, "visual_fingerprint": fps[0], "text_fingerprint": fps[1]}
    (run / FEATURES_FILE).write_text(
        json.dumps(features | {"annotations": str(captions), "val_annotations": None})
    )

    assert cli_main(["evaluate", "--model", str(run), "--captions", str(captions), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = evaluate(model, data, details=False).metrics
    assert got["split"] == "test.caption"
    assert {k: got[k] for k in ("r1", "r5", "r10", "r100", "sumr")} == pytest.approx(
        {k: want[k] for k in ("r1", "r5", "r10", "r100", "sumr")}
    )
    rows = (run / "eval" / "test.caption" / "per_query.jsonl").read_text().splitlines()
    assert len(rows) == len(synth.queries)

    # the MS-SL caption file has no split field, so --split test is refused with a clear message
    assert cli_main(["evaluate", "--model", str(run), "--split", "test"]) == 2
    assert "has no split 'test'" in capsys.readouterr().err
