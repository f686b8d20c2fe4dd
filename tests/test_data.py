"""Split loading from a real feature store (skips with reasons, fingerprints, dims); the training collate."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from models.config import load_preset
from storage.annotations import AnnotationSet, QueryRecord
from storage.feature_store import FeatureStore
from storage.synthetic import SyntheticConfig, make_synthetic_benchmark, write_to_store
from tasks.data import (
    DataError,
    TrainCollate,
    check_feature_dims,
    load_split,
    pick_fingerprints,
    train_loader,
)


@pytest.fixture(scope="module")
def synth_store():
    synth = make_synthetic_benchmark(SyntheticConfig(n_videos=20, max_rows=32, seed=5))
    store = FeatureStore("memory://test_data_store")
    return synth, store, write_to_store(synth, store)


def test_load_split_matches_the_generator(synth_store):
    synth, store, fps = synth_store
    data = load_split(store, synth.annotation_set(), "train", *fps)
    vids = synth.video_indices("train")
    assert data.name == "train" and data.skipped == []
    assert data.video_ids == [synth.videos[i].video_id for i in vids]
    for got, i in zip(data.video_feats, vids, strict=True):
        np.testing.assert_array_equal(got, synth.videos[i].features)
    np.testing.assert_array_equal(data.video_times[0], synth.videos[vids[0]].times)
    qs = synth.query_indices("train")
    assert [q.query_id for q in data.queries] == [synth.queries[j].query_id for j in qs]
    for got, j in zip(data.query_feats, qs, strict=True):
        np.testing.assert_array_equal(got, synth.query_tokens[j])
    assert [data.video_ids[v] for v in data.query_video] == [q.video_id for q in data.queries]
    assert data.positives() == [[v] for v in data.query_video]
    assert (data.visual_dim, data.query_dim) == (64, 48)


def test_missing_features_are_skipped_with_reasons(synth_store):
    synth, store, fps = synth_store
    real = list(synth.annotation_set("val").queries)
    extra = [
        QueryRecord("ghost#enc#0", "ghost", "a video nobody extracted", None, None, "val"),
        QueryRecord(f"{real[0].video_id}#enc#9", real[0].video_id, "text without features", 1.0, 2.0, "val"),
    ]
    data = load_split(store, AnnotationSet(real + extra), None, *fps, name="val")
    assert len(data.queries) == len(real) and "ghost" not in data.video_ids
    reasons = {(s.kind, s.id): s.reason for s in data.skipped}
    assert reasons[("video", "ghost")].startswith("no features under visual fingerprint")
    assert reasons[("query", "ghost#enc#0")] == "its video ghost was skipped"
    assert reasons[("query", f"{real[0].video_id}#enc#9")].startswith("no text features")
    with pytest.raises(DataError, match="no query has both"):
        load_split(store, AnnotationSet(extra[:1]), None, *fps)


def test_same_content_under_two_ids_gives_two_positives(synth_store):
    synth, store, fps = synth_store
    v = synth.videos[0]
    twin = "twin_of_" + v.video_id
    store.write_video(
        hashlib.sha256(v.features.tobytes()).hexdigest(), fps[0], v.features, v.times, video_id=twin
    )
    q = synth.queries[0]
    ann = AnnotationSet([q, QueryRecord("t#enc#0", twin, q.text, None, None, None)])
    data = load_split(store, ann, None, *fps)
    assert data.video_ids == [v.video_id, twin]
    assert data.positives() == [[0, 1], [0, 1]]


def test_fingerprints_picked_or_required(synth_store, tmp_path):
    synth, store, fps = synth_store
    ann = synth.annotation_set()
    assert pick_fingerprints(store, ann) == fps
    other = FeatureStore(f"memory://{tmp_path.name}")
    write_to_store(synth, other)
    # a second benchmark reuses the video ids synth00000..: two visual extractors now cover this data
    second = write_to_store(
        make_synthetic_benchmark(SyntheticConfig(n_videos=20, max_rows=32, seed=6)), other
    )
    with pytest.raises(DataError, match=rf"exactly one visual extractor .*{second[0]}.*--visual-fingerprint"):
        pick_fingerprints(other, ann)
    assert pick_fingerprints(other, ann, *fps) == fps
    with pytest.raises(DataError, match="found none"):
        pick_fingerprints(FeatureStore(f"memory://{tmp_path.name}-empty"), ann)


def test_dimension_mismatch_names_both_dims():
    cfg = load_preset("tvr").model
    with pytest.raises(
        DataError, match=r"visual features fpV are 1024-d but the model config expects visual_dim=3072"
    ):
        check_feature_dims(cfg, ("fpV", 1024), ("fpT", 768))
    with pytest.raises(DataError, match=r"text features fpT are 1024-d .* query_dim=768"):
        check_feature_dims(cfg, ("fpV", 3072), ("fpT", 1024))
    check_feature_dims(cfg, ("fpV", 3072), ("fpT", 768))


def _l2(rows: np.ndarray) -> np.ndarray:
    return rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-5)


def test_collate_hand_checked():
    """MODEL_SPEC §3.1: T < n_clips repeats rows, T > max_ctx_l averages windows (row T-1 unused)."""
    short = np.array([[i, 1.0] for i in range(3)], dtype=np.float32)  # T=3
    long = np.array([[i, 1.0] for i in range(10)], dtype=np.float32)  # T=10
    tok = [np.ones((3, 2), np.float32) * (k + 1) for k in range(3)]
    batch = TrainCollate(n_clips=4, max_ctx_l=4, max_desc_l=2)([(short, tok[:1]), (long, tok[1:])])
    # T=3 into 4 clips: edges round([0, .75, 1.5, 2.25, 3]) = [0, 1, 2, 2, 3] -> clamp 2 -> rows 0, 1, 2, 2
    np.testing.assert_allclose(batch.videos.clip_feats[0], _l2(short[[0, 1, 2, 2]]), rtol=1e-6)
    # T=10 into 4 windows: edges [0, 2, 5, 8, 9] (half to even, clamped) -> means of 0-1, 2-4, 5-7 and row 8
    want = _l2(np.array([[0.5, 1], [3, 1], [6, 1], [8, 1]], dtype=np.float32))
    np.testing.assert_allclose(batch.videos.frame_feats[1], want, rtol=1e-6)
    np.testing.assert_allclose(batch.videos.clip_feats[1], want, rtol=1e-6)
    # the short video keeps its 3 frames, padded to 4 with a 0 mask
    np.testing.assert_allclose(batch.videos.frame_feats[0, :3], _l2(short), rtol=1e-6)
    assert batch.videos.frame_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert float(batch.videos.frame_feats[0, 3].abs().sum()) == 0.0
    # captions: contiguous per video, truncated to 2 tokens, L2 per token, labels = video index
    assert batch.labels.tolist() == [0, 1, 1]
    assert batch.queries.tokens.shape == (3, 2, 2) and batch.queries.mask.tolist() == [[1, 1]] * 3
    np.testing.assert_allclose(batch.queries.tokens.norm(dim=-1), torch.full((3, 2), 1.0), atol=1e-4)


def test_train_loader_covers_each_video_once_in_seeded_order(synth_store):
    synth, store, fps = synth_store
    data = load_split(store, synth.annotation_set(), "train", *fps)
    cfg = load_preset("demo", {"visual_dim": 64, "query_dim": 48, "batch_size": 4, "max_ctx_l": 32})
    gen = torch.Generator()
    loader = train_loader(data, cfg, gen, torch.device("cpu"))

    def epoch_order(seed: int) -> list[float]:
        gen.manual_seed(seed)
        return [float(x) for b in loader for x in b.videos.clip_feats[:, 0, 0]]

    first = epoch_order(1)
    assert len(first) == len(data.video_ids) == sum(len(b.videos) for b in loader)
    assert epoch_order(1) == first and epoch_order(2) != first
    batch = next(iter(loader))
    assert batch.labels.tolist() == sorted(batch.labels.tolist())  # captions of a video are contiguous
