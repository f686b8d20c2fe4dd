"""Index building and search (tasks/search.py).

Exactness against the model's own scoring, incremental updates, removal, model-change invalidation, error
paths, the approximate stage and the CLI, on tiny random models. Retrieval quality and fp16/fp32 agreement
of a model trained on the demo corpus: tests/test_search_quality.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import cli
from models.config import MamFusionConfig
from models.mamfusion import MamFusion
from storage.catalog import Catalog, VideoRecord
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore
from storage.index import IndexModelMismatchError, IndexNotFoundError, VideoIndex
from storage.registry import ExtractorSnapshot, FeatureSource, ModelDir, RegistryError
from tasks.extract import extract_queries
from tasks.moments import SpanRule, clip_range
from tasks.profiles import feature_profile
from tasks.search import (
    ApproxConfig,
    ApproximateSearch,
    IndexScanner,
    QueryError,
    Searcher,
    build_index,
    encode_for_index,
)

VISUAL_FP, TEXT_FP = "visual-test", "text-test"
N = 10  # videos in the random gallery
TINY = MamFusionConfig(visual_dim=16, query_dim=12, hidden_size=16, n_heads=2, max_ctx_l=40, max_desc_l=10)


class HashTextEncoder:
    """Deterministic per-word token features, for texts no store holds."""

    def encode(self, texts):
        return [
            np.stack(
                [np.random.default_rng(list(w.encode())).standard_normal(TINY.query_dim) for w in t.split()]
            )
            for t in texts
        ]


def _snapshot(store: FeatureStore, fp: str, kind: str, dim: int) -> ExtractorSnapshot:
    try:
        return ExtractorSnapshot(fingerprint=fp, **store.extractor_info(fp))
    except MamFusionError:  # not registered (the hash encoder stands in for it)
        return ExtractorSnapshot(fingerprint=fp, kind=kind, dim=dim, config={})


def _write_model(model: MamFusion, directory: Path, store_url: str, visual_fp: str, text_fp: str) -> Path:
    model.save_pretrained(directory)
    store = FeatureStore(store_url)
    cfg = model.config
    source = FeatureSource(
        store=store_url,
        visual=_snapshot(store, visual_fp, "visual", cfg.visual_dim),
        text=_snapshot(store, text_fp, "text", cfg.query_dim),
        data_digest="test",
    )
    (directory / "features.json").write_text(source.model_dump_json())
    return directory


def _video(i: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    n = n or int(rng.choice([10, 16, 24]))  # few distinct lengths, so same-length videos share forward passes
    edges = np.arange(n + 1) * 0.5
    return rng.standard_normal((n, TINY.visual_dim)).astype(np.float32), np.stack([edges[:-1], edges[1:]], 1)


class Gallery:
    """A tiny random model and a feature store of random videos, with a catalog over them."""

    def __init__(self, root: Path, n_videos: int) -> None:
        self.root = root
        self.store = FeatureStore(str(root / "store"))
        self.store.register_extractor(VISUAL_FP, kind="visual", dim=TINY.visual_dim, config={"test": 1})
        self.shas: dict[str, str] = {}
        for i in range(n_videos):
            self.add(f"v{i:03d}", i)
        torch.manual_seed(0)
        self.model_dir = _write_model(MamFusion(TINY), root / "model", self.store.url, VISUAL_FP, TEXT_FP)
        self.index_url = str(root / "index.zarr")

    def add(self, video_id: str, seed: int) -> None:
        feats, times = _video(seed)
        sha = hashlib.sha256(feats.tobytes()).hexdigest()
        self.store.write_video(sha, VISUAL_FP, feats, times, video_id=video_id)
        self.shas[video_id] = sha

    def catalog(self, ids=None) -> Catalog:
        ids = sorted(self.shas) if ids is None else ids
        return Catalog(str(self.root), [_record(v, self.shas[v]) for v in ids])

    def searcher(self, **kwargs) -> Searcher:
        index = VideoIndex.open(self.index_url)
        return Searcher(
            MamFusion.from_pretrained(self.model_dir), HashTextEncoder(), IndexScanner(index, **kwargs)
        )


def _record(video_id: str, sha: str | None, error: str | None = None) -> VideoRecord:
    path = f"/videos/{video_id}.mp4"
    return VideoRecord(video_id, path, f"{video_id}.mp4", 1, 0, sha, 10.0, 25.0, 250, 64, 48, error)


@pytest.fixture
def gallery(tmp_path) -> Gallery:
    return Gallery(tmp_path, N)


class EncodeSpy:
    """Counts videos passed through MamFusion.encode_videos."""

    def __init__(self, monkeypatch) -> None:
        self.videos = 0
        original = MamFusion.encode_videos

        def spy(model, batch):
            self.videos += len(batch)
            return original(model, batch)

        monkeypatch.setattr(MamFusion, "encode_videos", spy)


# ----------------------------------------------------------------------------------------------- exactness
def test_scan_matches_model_scoring_and_moments(gallery):
    """fp32 index + chunked scan == MamFusion.score_with_moments over the gallery, across block edges."""
    build_index(
        gallery.model_dir,
        gallery.store,
        gallery.index_url,
        catalog=gallery.catalog(),
        dtype="float32",
        chunk_rows=3,
    )
    model = MamFusion.from_pretrained(gallery.model_dir).eval()
    ids = sorted(gallery.shas)
    videos = gallery.store.read_videos(VISUAL_FP, [gallery.shas[v] for v in ids])
    from models.preprocess import clip_spans, collate_queries, collate_videos

    with torch.inference_mode():
        emb = model.encode_videos(collate_videos([v.features for v in videos], TINY.map_size, TINY.max_ctx_l))
        texts = ["a person opens the door", "dog runs", "someone cooks dinner in a kitchen"]
        q = model.encode_queries(collate_queries(HashTextEncoder().encode(texts), TINY.max_desc_l))
        want_scores, want_clip = model.score_with_moments(q, emb)

    index = VideoIndex.open(gallery.index_url)
    searcher = Searcher(model, HashTextEncoder(), IndexScanner(index))  # blocks of 3 rows
    hits = searcher.search(texts, top_k=len(ids))
    for qi, per_query in enumerate(hits):
        order = torch.argsort(want_scores[qi], descending=True).tolist()
        assert [h.video_id for h in per_query] == [ids[j] for j in order]
        np.testing.assert_allclose(
            [h.score for h in per_query], want_scores[qi, order].numpy(), rtol=1e-5, atol=1e-6
        )
        qn = torch.nn.functional.normalize(q, dim=-1)
        for h in per_query:
            j = ids.index(h.video_id)
            spans = clip_spans(videos[j].times, TINY.map_size)
            start, end = spans[want_clip[qi, j]].tolist()
            assert (h.clip_start, h.clip_end) == pytest.approx((start, end))  # the single-clip baseline
            want_profile = torch.nn.functional.normalize(emb.clips[j], dim=-1) @ qn[qi]
            np.testing.assert_allclose(h.profile, want_profile.numpy(), atol=2e-5)
            assert int(np.argmax(h.profile)) == int(want_clip[qi, j])
            lo, hi = clip_range(want_profile.numpy(), SpanRule())
            assert (h.start, h.end) == pytest.approx((float(spans[lo, 0]), float(spans[hi, 1])))
            assert h.start <= h.clip_start and h.end >= h.clip_end  # the span contains the best clip
            assert h.path == f"/videos/{h.video_id}.mp4"
        assert [h.rank for h in per_query] == list(range(1, len(ids) + 1))


def test_streamed_index_and_both_kernels_give_the_same_hits(gallery):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog(), chunk_rows=4)
    texts = ["a man rides a horse", "the light turns on"]
    in_ram = gallery.searcher(kernel="matmul")
    assert gallery.searcher().scanner.kernel == "fused"  # "auto" on an fp16 index
    want = in_ram.search(texts, 5)
    for budget in (None, 0):  # in RAM, and streamed chunk by chunk from the store
        for kernel in ("matmul", "fused"):
            searcher = gallery.searcher(max_memory_bytes=budget, kernel=kernel)
            assert (searcher.scanner.vectors is None) == (budget == 0)
            got = searcher.search(texts, 5)
            for g, w in zip(got, want, strict=True):
                assert [(h.video_id, h.start, h.end) for h in g] == [(h.video_id, h.start, h.end) for h in w]
                np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=1e-5)


# ----------------------------------------------------------------------------------------------- building
def test_build_stores_normalised_vectors_spans_and_identity(gallery):
    summary = build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    assert sorted(summary.added) == sorted(gallery.shas) and summary.kept == 0 and summary.rebuilt is None
    index = VideoIndex.open(gallery.index_url)
    assert (index.count, index.dtype, index.n_clips, index.dim, index.complete) == (
        N,
        "float16",
        32,
        16,
        True,
    )
    norms = np.linalg.norm(index.load_vectors().astype(np.float32), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    rows = index.rows()
    assert [gallery.shas[v] for v in rows.video_ids] == list(rows.sha256)
    assert list(rows.paths) == [f"/videos/{v}.mp4" for v in rows.video_ids]
    spans = index.read_spans()
    assert spans.shape == (N, 32, 2) and (spans[..., 1] > spans[..., 0]).all()


def test_incremental_add_encodes_only_new_videos(gallery, monkeypatch):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    spy = EncodeSpy(monkeypatch)
    loads = []
    real = MamFusion.from_pretrained.__func__
    monkeypatch.setattr(
        MamFusion, "from_pretrained", classmethod(lambda *a, **k: loads.append(1) or real(*a, **k))
    )
    again = build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    assert (spy.videos, again.added, again.kept) == (0, [], N)
    assert loads == []  # nothing to encode: no weights read
    gallery.add("new1", 100)
    gallery.add("new2", 101)
    more = build_index(
        gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog(), batch_size=1
    )
    assert spy.videos == 2 and sorted(more.added) == ["new1", "new2"] and more.kept == N
    assert loads == [1]  # once for the two batches
    assert VideoIndex.open(gallery.index_url).count == N + 2


def test_removed_video_disappears_from_results_and_can_come_back(gallery, monkeypatch):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    everyone = sorted(gallery.shas)
    spy = EncodeSpy(monkeypatch)
    summary = build_index(
        gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog(everyone[1:])
    )
    assert summary.removed == [everyone[0]] and spy.videos == 0
    hits = gallery.searcher().search(["anything at all", "the light turns on"], top_k=100)
    for per_query in hits:
        assert len(per_query) == N - 1 and everyone[0] not in {h.video_id for h in per_query}
    back = build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    assert back.added == [everyone[0]] and spy.videos == 1
    assert len(gallery.searcher().search(["anything"], top_k=100)[0]) == N


def test_changed_content_is_reencoded(gallery, monkeypatch):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    gallery.add("v005", 999)  # same id, new content
    spy = EncodeSpy(monkeypatch)
    summary = build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    assert summary.removed == ["v005"] and summary.added == ["v005"] and spy.videos == 1
    rows = VideoIndex.open(gallery.index_url).rows()
    live = {str(v): str(s) for v, s, a in zip(rows.video_ids, rows.sha256, rows.alive, strict=True) if a}
    assert live["v005"] == gallery.shas["v005"] and len(live) == N


def test_model_change_invalidates_the_index(gallery, monkeypatch):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    torch.manual_seed(1)
    MamFusion(TINY).save_pretrained(gallery.model_dir)  # retrained into the same directory
    with pytest.raises(IndexModelMismatchError, match="rebuild it with `mamfusion index"):
        Searcher.from_model_dir(gallery.model_dir, gallery.index_url)
    spy = EncodeSpy(monkeypatch)
    summary = build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    assert summary.rebuilt and "built by model" in summary.rebuilt and spy.videos == N
    assert VideoIndex.open(gallery.index_url).count == N


def test_dtype_change_rebuilds(gallery):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    summary = build_index(
        gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog(), dtype="float32"
    )
    assert summary.rebuilt == "stored as float16, float32 requested"
    assert VideoIndex.open(gallery.index_url).dtype == "float32"


def test_gallery_problems_are_skipped_with_reasons(gallery):
    catalog = gallery.catalog()
    extra = [
        _record("broken", None, error="moov atom not found"),
        _record("nohash", None),
        _record("noft", "ab" * 32),
    ]
    summary = build_index(
        gallery.model_dir,
        gallery.store,
        gallery.index_url,
        catalog=Catalog(catalog.root, catalog.videos + extra),
    )
    reasons = {s.id: s.reason for s in summary.skipped}
    assert reasons["broken"] == "unreadable: moov atom not found"
    assert "no sha256" in reasons["nohash"] and "no features for visual extractor" in reasons["noft"]
    by_ids = build_index(
        gallery.model_dir, gallery.store, str(gallery.root / "ids.zarr"), video_ids=["v001", "zzz"]
    )
    assert by_ids.added == ["v001"] and by_ids.skipped[0].id == "zzz"
    assert list(VideoIndex.open(str(gallery.root / "ids.zarr")).rows().paths) == [""]


def test_default_index_location_is_inside_the_model_dir(gallery):
    summary = build_index(gallery.model_dir, None, catalog=gallery.catalog())  # store from features.json
    assert summary.index_url == str(gallery.model_dir / "index.zarr")
    assert VideoIndex.open(summary.index_url).count == N


# ----------------------------------------------------------------------------------------------- errors
def test_query_errors(gallery):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    searcher = gallery.searcher()
    with pytest.raises(QueryError, match="query 1 is empty"):
        searcher.search(["fine", "   "])
    with pytest.raises(QueryError, match="query 0 has 1001 characters; the limit is 1000"):
        searcher.search(["x" * 1001])
    with pytest.raises(QueryError, match="no query given"):
        searcher.search([])
    with pytest.raises(QueryError, match="top_k must be at least 1"):
        searcher.search(["fine"], top_k=0)


def test_missing_index_and_model_files(gallery):
    with pytest.raises(
        IndexNotFoundError, match="no search index at .*index.zarr; build it with `mamfusion index`"
    ):
        Searcher.from_model_dir(gallery.model_dir)
    (gallery.model_dir / "features.json").unlink()
    with pytest.raises(RegistryError, match="features.json: missing"):
        Searcher.from_model_dir(gallery.model_dir, gallery.index_url)
    with pytest.raises(TypeError, match="exactly one gallery"):
        build_index(gallery.model_dir, gallery.store, gallery.index_url)


def test_feature_size_mismatch_is_reported(gallery):
    wide = MamFusionConfig(**{**TINY.model_dump(), "visual_dim": 20})
    model_dir = _write_model(MamFusion(wide), gallery.root / "wide", gallery.store.url, VISUAL_FP, TEXT_FP)
    with pytest.raises(ValueError, match=r"are \[16\]-d, the model expects 20"):
        build_index(model_dir, gallery.store, str(gallery.root / "w.zarr"), catalog=gallery.catalog())


# ----------------------------------------------------------------------------------------------- approximate
def test_approximate_stage_rescoring_is_exact_and_finds_the_best(gallery):
    build_index(
        gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog(), dtype="float32"
    )
    searcher = gallery.searcher()
    texts = ["a person opens the door", "dog runs fast"]
    exact = searcher.search(texts, top_k=3)
    ann = ApproximateSearch(
        searcher.scanner, ApproxConfig(factory="IVF2,Flat", nprobe=2, candidates=500, train_vectors=400)
    )
    searcher.ranker = ann
    approx = searcher.search(texts, top_k=3)
    # every vector is a candidate here, so re-scoring must reproduce the exact list (up to summation order)
    for got, want in zip(approx, exact, strict=True):
        assert [(h.video_id, h.start, h.end) for h in got] == [(h.video_id, h.start, h.end) for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-6)
    searcher.scanner.alive[:] = False
    assert searcher.search(texts, top_k=3) == [[], []]
    with pytest.raises(ValueError, match="cannot be trained on 10 videos .*search exactly instead"):
        ApproximateSearch(searcher.scanner, ApproxConfig(factory="IVF1024,Flat"))


def test_default_approximate_stage_finds_exact_matches_and_scales_its_candidates(tmp_path):
    """Default fast-scan IVF-PQ over 400 synthetic videos: a query equal to a stored clip finds its video."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 33, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    index = VideoIndex.create(str(tmp_path / "ann.zarr"), model_fingerprint="m", dim=64, n_clips=32)
    ids = [f"v{i}" for i in range(400)]
    index.append(vectors, np.zeros((400, 32, 2)), ids, ids, ids)
    scanner = IndexScanner(index)
    ann = ApproximateSearch(scanner)
    rows = rng.choice(400, 50, replace=False)
    queries = torch.from_numpy(vectors[rows, rng.integers(0, 32, 50)])
    exact, approx = scanner.topk(queries, 5, (0.7, 0.3)), ann.topk(queries, 5, (0.7, 0.3))
    assert (approx.rows[:, 0] == torch.from_numpy(rows)).float().mean() >= 0.95
    assert torch.equal(exact.rows[:, 0], torch.from_numpy(rows))
    found = approx.rows == exact.rows
    torch.testing.assert_close(approx.scores[found], exact.scores[found], rtol=1e-5, atol=1e-6)
    assert ann.factory == "IVF256,PQ8x4fs"  # 64-d: 8 sub-quantizers of 8 dims
    config = ApproxConfig()
    assert [config.candidates_for(n) for n in (400, 100_000, 1_000_000, 10**8)] == [256, 256, 2000, 4096]
    assert ApproxConfig(candidates=7).candidates_for(10**6) == 7
    assert [config.factory_for(d) for d in (384, 100, 7)] == [
        "IVF256,PQ48x4fs",
        "IVF256,PQ10x4fs",
        "IVF256,PQ1x4fs",
    ]
    with pytest.raises(ValueError, match=r"faiss index 'IVF256,PQ5x4' for 64-d vectors: .*multiple of"):
        ApproximateSearch(scanner, ApproxConfig(factory="IVF256,PQ5x4"))


def test_encode_for_index_is_normalised_and_batch_independent():
    torch.manual_seed(0)
    model = MamFusion(TINY).eval()
    videos = [_video(i, n) for i, n in enumerate((10, 24, 16))]  # padding would change the frame branch
    together, spans = encode_for_index(model, [f for f, _ in videos], [t for _, t in videos])
    alone, _ = encode_for_index(model, [videos[1][0]], [videos[1][1]])
    np.testing.assert_allclose(np.linalg.norm(together, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(together[1], alone[0], atol=1e-6)
    assert spans.shape == (3, TINY.map_size, 2)


def test_copied_model_dir_keeps_its_index_valid(gallery):
    """The fingerprint is the files' content: a published copy of the same model can use the same index."""
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    copy = shutil.copytree(gallery.model_dir, gallery.root / "published")
    VideoIndex.open(gallery.index_url).check_model(ModelDir(copy).fingerprint())


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_index_then_search_with_the_real_text_backbone(gallery, capsys):
    """`mamfusion index` + `mamfusion search --json` end to end, queries through MiniLM as in training."""
    profile = feature_profile("lite", text={"device": "cpu"})
    text_fp = extract_queries(["a caption seen in training"], profile, gallery.store).fingerprint
    config = MamFusionConfig(**{**TINY.model_dump(), "query_dim": 384})
    model_dir = _write_model(
        MamFusion(config), gallery.root / "cli-model", gallery.store.url, VISUAL_FP, text_fp
    )
    catalog_path = gallery.root / "catalog.json"
    gallery.catalog().save(catalog_path)

    assert cli.main(["index", "--model", str(model_dir), "--catalog", str(catalog_path), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert len(built["added"]) == N and built["index_url"] == str(model_dir / "index.zarr")

    argv = ["search", "a person turns on the light", "a dog", "--model", str(model_dir), "--top-k", "3"]
    assert cli.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in result["results"]] == ["a person turns on the light", "a dog"]
    for r in result["results"]:
        assert [h["rank"] for h in r["hits"]] == [1, 2, 3]
        assert all(h["path"] == f"/videos/{h['video_id']}.mp4" and h["end"] > h["start"] for h in r["hits"])
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "query: a dog" in table and "moment (s)" in table

    assert cli.main(["search", "  ", "--model", str(model_dir)]) == 2
    assert "query 0 is empty" in capsys.readouterr().err
    assert (
        cli.main(["search", "x", "--model", str(model_dir), "--index", str(gallery.root / "none.zarr")]) == 2
    )
    assert "no search index at" in capsys.readouterr().err
    assert (
        cli.main(["search", "x", "--model", str(gallery.model_dir), "--index", str(model_dir / "index.zarr")])
        == 2
    )
    assert "was built by model" in capsys.readouterr().err


def test_cli_index_from_an_annotation_split(gallery, capsys):
    annotations = gallery.root / "captions.csv"
    annotations.write_text(
        "video_id,start,end,caption,split\nv001,0,1,a cat,test\nv002,0,1,a dog,train\nv003,1,2,a bird,test\n"
    )
    argv = ["index", "--model", str(gallery.model_dir), "--annotations", str(annotations), "--split", "test"]
    assert cli.main([*argv, "--out", gallery.index_url, "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["added"]) == ["v001", "v003"]
    assert cli.main([*argv, "--out", gallery.index_url]) == 0
    assert "0 added, 0 removed, 2 kept, 0 skipped" in capsys.readouterr().out
    assert (
        cli.main(["index", "--model", str(gallery.root / "nowhere"), "--annotations", str(annotations)]) == 2
    )
    assert "no such model folder" in capsys.readouterr().err


def _tree_state(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under the roots with its size and mtime: what a read-only user must leave as it was."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_search_writes_nothing_and_needs_no_store(gallery, monkeypatch):
    """Search reads the model folder and the index only; the training store is not even opened."""
    import tasks.search

    # the model's text extractor is a test stand-in: build it from the snapshot without loading weights
    monkeypatch.setattr(tasks.search, "text_encoder_from_info", lambda info, fp: HashTextEncoder())
    build_index(gallery.model_dir, gallery.store, catalog=gallery.catalog())
    before = _tree_state(gallery.model_dir, gallery.root / "store")
    for p in [gallery.model_dir, *gallery.model_dir.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        shutil.rmtree(gallery.root / "store")  # gone: search must not need it
        searcher = Searcher.from_model_dir(gallery.model_dir)
        hits = searcher.search(["a person opens the door"], top_k=3)[0]
        assert [h.rank for h in hits] == [1, 2, 3]
        assert not (gallery.root / "store").exists()  # nothing re-created it
        assert _tree_state(gallery.model_dir) == {
            k: v for k, v in before.items() if k.startswith(str(gallery.model_dir))
        }
    finally:
        for p in [gallery.model_dir, *gallery.model_dir.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_index_with_a_mistyped_store_fails_and_creates_nothing(gallery, capsys):
    catalog_path = gallery.root / "catalog.json"
    gallery.catalog().save(catalog_path)
    typo = gallery.root / "stroe"
    argv = ["index", "--model", str(gallery.model_dir), "--catalog", str(catalog_path), "--store", str(typo)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(typo) in err and "Traceback" not in err
    assert not typo.exists()


def test_invalid_utf8_query_is_a_clear_error(gallery, capsys):
    build_index(gallery.model_dir, gallery.store, gallery.index_url, catalog=gallery.catalog())
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what argv holds for a Latin-1 terminal
    with pytest.raises(QueryError, match="query 0 is not valid UTF-8"):
        gallery.searcher().search([bad])
