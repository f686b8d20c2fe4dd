"""The synthetic feature-level PRVR benchmark: reproducible, well-formed, learnable, partially relevant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest

from storage.feature_store import FeatureStore
from storage.synthetic import (
    SyntheticConfig,
    SyntheticPRVR,
    make_synthetic_benchmark,
    synthetic_fingerprints,
    write_to_store,
)

CFG = SyntheticConfig(n_videos=120, seed=0)


@pytest.fixture(scope="module")
def synth() -> SyntheticPRVR:
    return make_synthetic_benchmark(CFG)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rows_in(synth: SyntheticPRVR, j: int) -> np.ndarray:
    """The rows of query j's video whose time span lies inside the query's [start, end]."""
    q, video = synth.queries[j], synth.videos[synth.query_video[j]]
    inside = (video.times[:, 0] >= q.start) & (video.times[:, 1] <= q.end)
    return video.features[inside]


def _nearest_concept(synth: SyntheticPRVR, x: np.ndarray) -> int:
    """Index into prototypes, or -1 - k for distractor k."""
    scores = np.concatenate([synth.prototypes @ x, synth.distractor_prototypes @ x])
    best = int(np.argmax(scores))
    return best if best < len(synth.prototypes) else len(synth.prototypes) - 1 - best


def _oracle_ranks(synth: SyntheticPRVR, pool: str) -> np.ndarray:
    """Rank of each query's own video for a scorer that knows the projection: best single row ("best") or
    whole-video mean ("mean")."""
    queries = _unit(np.stack([t.mean(axis=0) for t in synth.query_tokens]))
    if pool == "best":
        per_video = [(_unit(v.features @ synth.projection) @ queries.T).max(axis=0) for v in synth.videos]
    else:
        per_video = [_unit(v.features.mean(axis=0) @ synth.projection) @ queries.T for v in synth.videos]
    scores = np.stack(per_video, axis=1)
    own = scores[np.arange(len(queries)), synth.query_video]
    return (scores > own[:, None]).sum(axis=1) + 1


def _oracle_r1(synth: SyntheticPRVR, pool: str) -> float:
    return float((_oracle_ranks(synth, pool) == 1).mean())


def test_same_seed_same_benchmark(synth: SyntheticPRVR) -> None:
    again = make_synthetic_benchmark(CFG)
    assert again.queries == synth.queries
    for a, b in zip(synth.videos, again.videos, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.times, b.times)
        assert a.events == b.events
    for a, b in zip(synth.query_tokens, again.query_tokens, strict=True):
        np.testing.assert_array_equal(a, b)


def test_another_seed_another_benchmark(synth: SyntheticPRVR) -> None:
    other = make_synthetic_benchmark(CFG.model_copy(update={"seed": 1}))
    assert not np.array_equal(other.prototypes, synth.prototypes)
    assert [len(v.features) for v in other.videos] != [len(v.features) for v in synth.videos]


def test_more_videos_extend_fewer(synth: SyntheticPRVR) -> None:
    small = make_synthetic_benchmark(CFG.model_copy(update={"n_videos": 10}))
    for a, b in zip(small.videos, synth.videos[:10], strict=True):
        np.testing.assert_array_equal(a.features, b.features)


def test_shapes_dtypes_and_sizes(synth: SyntheticPRVR) -> None:
    assert len(synth.videos) == CFG.n_videos
    for video in synth.videos:
        n_rows = len(video.features)
        assert CFG.min_rows <= n_rows <= CFG.max_rows
        assert video.features.shape == (n_rows, CFG.visual_dim) and video.features.dtype == np.float32
        assert video.times.shape == (n_rows, 2) and video.times.dtype == np.float64
        np.testing.assert_allclose(video.times[:, 1] - video.times[:, 0], CFG.row_seconds)
        np.testing.assert_allclose(video.times[1:, 0], video.times[:-1, 1])
        assert video.times[0, 0] == 0.0
    for tokens in synth.query_tokens:
        assert CFG.min_tokens <= len(tokens) <= CFG.max_tokens
        assert tokens.shape[1] == CFG.query_dim and tokens.dtype == np.float32
    assert (
        len(synth.query_tokens) == len(synth.queries) == len(synth.query_concepts) == len(synth.query_video)
    )
    assert synth.projection.shape == (CFG.visual_dim, CFG.query_dim)


def test_events_tile_each_video(synth: SyntheticPRVR) -> None:
    for video in synth.videos:
        row = 0
        for event in video.events:
            assert event.first_row == row and event.n_rows > 0
            row += event.n_rows
        assert row == len(video.features)
        captioned = [e.concept for e in video.events if not e.distractor]
        assert CFG.min_events <= len(captioned) <= CFG.max_events
        assert len(set(captioned)) == len(captioned)
        distractor_rows = sum(e.n_rows for e in video.events if e.distractor)
        assert distractor_rows == round(CFG.distractor_share * len(video.features))


def test_queries_are_unique_and_point_at_one_event(synth: SyntheticPRVR) -> None:
    assert len({q.text for q in synth.queries}) == len(synth.queries)
    assert len({q.query_id for q in synth.queries}) == len(synth.queries)
    for j, q in enumerate(synth.queries):
        video = synth.videos[synth.query_video[j]]
        assert q.video_id == video.video_id and q.split == video.split
        spans = [
            (e.first_row * CFG.row_seconds, (e.first_row + e.n_rows) * CFG.row_seconds, e.concept)
            for e in video.events
            if not e.distractor
        ]
        assert (q.start, q.end, int(synth.query_concepts[j])) in spans
        assert f"(concept {synth.query_concepts[j]})" in q.text
    per_video = np.bincount(synth.query_video, minlength=len(synth.videos))
    assert (per_video == CFG.queries_per_video).all()


def test_each_query_concept_is_in_its_span_and_nowhere_else_in_the_video(synth: SyntheticPRVR) -> None:
    for j in range(len(synth.queries)):
        concept = int(synth.query_concepts[j])
        assert _nearest_concept(synth, _rows_in(synth, j).mean(axis=0)) == concept
        video = synth.videos[synth.query_video[j]]
        q = synth.queries[j]
        outside = (video.times[:, 1] <= q.start) | (video.times[:, 0] >= q.end)
        for event in video.events:
            rows = video.features[event.first_row : event.first_row + event.n_rows]
            if outside[event.first_row]:
                assert _nearest_concept(synth, rows.mean(axis=0)) != concept


def test_splits_are_disjoint_by_video(synth: SyntheticPRVR) -> None:
    ids = {s: {synth.videos[i].video_id for i in synth.video_indices(s)} for s in ("train", "val", "test")}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    assert sum(len(s) for s in ids.values()) == CFG.n_videos
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (84, 18, 18)
    for split, videos in ids.items():
        assert {synth.queries[j].video_id for j in synth.query_indices(split)} == videos
        annotations = synth.annotation_set(split)
        assert set(annotations.video_ids()) == videos
        assert all(q.split == split for q in annotations.queries)
    assert len(synth.annotation_set().queries) == len(synth.queries)


def test_an_oracle_that_knows_the_projection_finds_the_video(synth: SyntheticPRVR) -> None:
    """The task is learnable: the generative truth ranks the right video first far above chance."""
    chance = 1 / CFG.n_videos
    assert _oracle_r1(synth, "best") > 0.7 > 50 * chance


def test_partial_relevance_matters(synth: SyntheticPRVR) -> None:
    """Whole-video averages drown the captioned moment in shared distractors; the best segment does not."""
    best, mean = _oracle_r1(synth, "best"), _oracle_r1(synth, "mean")
    assert best - mean > 0.4
    no_distractors = make_synthetic_benchmark(CFG.model_copy(update={"distractor_share": 0.0}))
    assert _oracle_ranks(synth, "mean").mean() > 1.5 * _oracle_ranks(no_distractors, "mean").mean()


def test_difficulty_follows_the_noise_levels(synth: SyntheticPRVR) -> None:
    hard = make_synthetic_benchmark(
        CFG.model_copy(update={"row_noise": 1.5, "token_noise": 2.0, "instance_noise": 0.3})
    )
    assert _oracle_r1(hard, "best") < _oracle_r1(synth, "best") - 0.3


def test_invalid_configs_name_the_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="min_events"):
        SyntheticConfig(min_events=6, max_events=3)
    with pytest.raises(pydantic.ValidationError, match="min_rows"):
        SyntheticConfig(min_rows=8, max_rows=8, max_events=5, distractor_share=0.5)
    with pytest.raises(pydantic.ValidationError, match="n_concepts"):
        SyntheticConfig(n_concepts=3, max_events=5)
    with pytest.raises(pydantic.ValidationError, match="split_fractions"):
        SyntheticConfig(split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(pydantic.ValidationError, match="unknown_field|extra"):
        SyntheticConfig(unknown_field=1)


def test_fingerprints_follow_the_config() -> None:
    visual, text = synthetic_fingerprints(CFG)
    assert visual != text
    assert synthetic_fingerprints(SyntheticConfig(n_videos=120, seed=0)) == (visual, text)
    assert synthetic_fingerprints(CFG.model_copy(update={"seed": 1}))[0] != visual


def test_write_to_store_round_trips(tmp_path: Path) -> None:
    small = make_synthetic_benchmark(SyntheticConfig(n_videos=12, seed=3))
    store = FeatureStore(f"memory://{tmp_path.name}/synthetic")
    visual_fp, text_fp = write_to_store(small, store)
    assert (visual_fp, text_fp) == synthetic_fingerprints(small.config)
    assert store.extractor_info(visual_fp)["dim"] == small.config.visual_dim
    assert store.extractor_info(text_fp)["kind"] == "text"

    ids = [v.video_id for v in small.videos]
    resolved = store.resolve_video_ids(visual_fp, ids)
    assert sorted(resolved) == sorted(ids)
    assert len(set(resolved.values())) == len(ids)
    read = store.read_videos(visual_fp, [resolved[i] for i in ids])
    for video, got in zip(small.videos, read, strict=True):
        np.testing.assert_array_equal(got.features, video.features)
        np.testing.assert_array_equal(got.times, video.times)
    tokens = store.read_queries(text_fp, [q.text for q in small.queries])
    for want, got in zip(small.query_tokens, tokens, strict=True):
        np.testing.assert_array_equal(got, want)

    assert write_to_store(small, FeatureStore(store.url)) == (visual_fp, text_fp)  # idempotent re-run


def test_the_trainer_reads_it_back(tmp_path: Path) -> None:
    """The contract path training uses: annotations + store -> SplitData with the benchmark's own numbers."""
    from tasks.data import load_split

    small = make_synthetic_benchmark(SyntheticConfig(n_videos=12, seed=4))
    store = FeatureStore(tmp_path / "store")
    visual_fp, text_fp = write_to_store(small, store)
    data = load_split(store, small.annotation_set(), "train", visual_fp, text_fp)
    train = small.video_indices("train")
    assert data.video_ids == [small.videos[i].video_id for i in train]
    assert data.skipped == []
    np.testing.assert_array_equal(data.video_feats[0], small.videos[train[0]].features)
    first_query = small.query_indices("train")[0]
    np.testing.assert_array_equal(data.query_feats[0], small.query_tokens[first_query])
