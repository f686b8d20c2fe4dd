"""Preprocessing (MODEL_SPEC §2, §3.1) on small examples worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.preprocess import (
    average_to_clips,
    clip_boundaries,
    clip_spans,
    collate_queries,
    collate_videos,
    downsample_frames,
    l2_normalize_rows,
)


def ramp(T: int) -> np.ndarray:
    """Row i = [i, 10 i]: window means are easy to write down."""
    i = np.arange(T, dtype=np.float32)
    return np.stack([i, 10 * i], axis=1)


def test_boundaries_round_half_to_even_and_clamp() -> None:
    # k*10/4 = 0, 2.5, 5, 7.5, 10 -> round-half-even 0, 2, 5, 8, 10 -> clamp to 9
    assert clip_boundaries(10, 4).tolist() == [0, 2, 5, 8, 9]
    # k*3/8 = 0, .375, .75, 1.125, 1.5, 1.875, 2.25, 2.625, 3 -> 0,0,1,1,2,2,2,3,3 -> clamp to 2
    assert clip_boundaries(3, 8).tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert clip_boundaries(1, 32).tolist() == [0] * 33


def test_average_to_clips_means_and_the_dropped_last_row() -> None:
    clips = average_to_clips(ramp(10), n_clips=4)
    # windows [0,2) [2,5) [5,8) [8,9): row 9 never enters a mean
    np.testing.assert_allclose(clips[:, 0].numpy(), [0.5, 3.0, 6.0, 8.0])
    np.testing.assert_allclose(clips[:, 1].numpy(), [5.0, 30.0, 60.0, 80.0])


def test_average_to_clips_repeats_rows_when_short() -> None:
    clips = average_to_clips(ramp(3), n_clips=8)
    # empty windows take row b_k; [0,1) and [1,2) are single rows
    assert clips[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 2, 2]


def test_average_to_clips_default_is_32_and_keeps_float64() -> None:
    x = np.random.default_rng(0).normal(size=(100, 5))
    out = average_to_clips(x)
    assert out.shape == (32, 5) and out.dtype == torch.float64
    # boundaries round(k*100/32): window 0 = rows [0, 3)
    np.testing.assert_allclose(out[0].numpy(), x[0:3].mean(axis=0), rtol=1e-12)


def test_downsample_frames_keeps_short_videos_and_averages_long_ones() -> None:
    short = ramp(6)
    assert torch.equal(downsample_frames(short, 6), torch.from_numpy(short))
    long = downsample_frames(ramp(10), 4)
    np.testing.assert_allclose(long[:, 0].numpy(), [0.5, 3.0, 6.0, 8.0])


def test_l2_normalize_adds_eps_to_the_norm() -> None:
    out = l2_normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out.numpy(), [[3 / 5.00001, 4 / 5.00001], [0.0, 0.0]], rtol=1e-12)


def test_clip_spans_follow_the_same_windows() -> None:
    times = np.stack([np.arange(10.0), np.arange(10.0) + 1], axis=1)  # row i covers [i, i+1) s
    assert clip_spans(times, 4).tolist() == [[0, 2], [2, 5], [5, 8], [8, 9]]
    short = np.array([[0.0, 1.5], [1.5, 3.0], [3.0, 4.5]])
    spans = clip_spans(short, 8).tolist()
    assert spans == [[0, 1.5], [0, 1.5], [1.5, 3.0], [1.5, 3.0]] + [[3.0, 4.5]] * 4


def test_clip_spans_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        clip_spans(np.zeros((5, 3)), 4)


def test_collate_videos_pads_frames_and_normalises_rows() -> None:
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(t, 6)).astype(np.float32) for t in (5, 20, 50)]  # 50 > max_ctx_l
    batch = collate_videos(feats, n_clips=8, max_ctx_l=16)
    assert batch.clip_feats.shape == (3, 8, 6) and batch.frame_feats.shape == (3, 16, 6)
    assert batch.frame_mask.dtype == torch.float32
    assert batch.frame_mask.sum(dim=1).tolist() == [5, 16, 16]
    assert torch.all(batch.frame_feats[0, 5:] == 0)
    norms = batch.frame_feats[0, :5].norm(dim=-1)
    np.testing.assert_allclose(
        norms.numpy(),
        (np.linalg.norm(feats[0], axis=1) / (np.linalg.norm(feats[0], axis=1) + 1e-5)),
        rtol=1e-6,
    )
    expected_clip0 = feats[2][0 : round(50 / 8)].mean(axis=0)  # round(6.25) = 6 rows
    expected_clip0 /= np.linalg.norm(expected_clip0) + 1e-5
    np.testing.assert_allclose(batch.clip_feats[2, 0].numpy(), expected_clip0, rtol=1e-5)
    assert len(batch) == 3 and batch.to("cpu").frame_feats.shape == (3, 16, 6)


def test_collate_queries_truncates_after_normalising() -> None:
    rng = np.random.default_rng(2)
    long_query = rng.normal(size=(40, 4))
    batch = collate_queries([rng.normal(size=(3, 4)), long_query], max_desc_l=30)
    assert batch.tokens.shape == (2, 30, 4)
    assert batch.mask.sum(dim=1).tolist() == [3, 30]
    assert torch.all(batch.tokens[0, 3:] == 0)
    expected = long_query[:30] / (np.linalg.norm(long_query[:30], axis=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(batch.tokens[1].numpy(), expected, rtol=1e-6)


def test_empty_inputs_are_rejected_with_their_index() -> None:
    with pytest.raises(ValueError, match="video 1"):
        collate_videos([np.ones((3, 2)), np.ones((0, 2))], n_clips=4, max_ctx_l=8)
    with pytest.raises(ValueError, match="empty batch"):
        collate_queries([], max_desc_l=30)
