"""Losses of MODEL_SPEC §6 against values computed independently with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.config import MamFusionConfig
from models.losses import (
    MamFusionLoss,
    _t2v_negatives,
    _v2t_negatives,
    info_nce,
    positive_mask,
    query_diverse,
    triplet_ranking,
)
from models.mamfusion import MamFusionOutput

LABELS = torch.tensor([0, 0, 1, 2])  # video 0 owns queries 0, 1
SCORES = np.array(
    [
        [0.9, 0.2, 0.4],
        [0.3, 0.5, 0.1],
        [0.6, 0.7, 0.0],
        [0.2, 0.8, 0.65],
    ]
)


def lse(x: np.ndarray) -> float:
    return float(np.log(np.exp(x).sum()))


def test_info_nce_matches_hand_computation() -> None:
    t2v = np.mean([lse(SCORES[i]) - SCORES[i, int(LABELS[i])] for i in range(4)])
    v2t_terms = [
        lse(SCORES[:, 0]) - lse(SCORES[[0, 1], 0]),
        lse(SCORES[:, 1]) - SCORES[2, 1],
        lse(SCORES[:, 2]) - SCORES[3, 2],
    ]
    got = info_nce(torch.tensor(SCORES), LABELS)
    assert got.item() == pytest.approx(t2v + np.mean(v2t_terms), rel=1e-12)


def test_triplet_with_hardest_negatives_by_hand() -> None:
    m = 0.2
    # v2t: positives are the mean over own queries; hardest negative = max over other queries
    v2t = [
        max(0, m + max(0.6, 0.2) - (0.9 + 0.3) / 2),  # video 0: negatives q2, q3
        max(0, m + max(0.2, 0.5, 0.8) - 0.7),  # video 1
        max(0, m + max(0.4, 0.1, 0.0) - 0.65),  # video 2
    ]
    # t2v with hard_pool_size=1: the single hardest negative video
    t2v = [max(0, m + 0.4 - 0.9), max(0, m + 0.5 - 0.3), max(0, m + 0.6 - 0.7), max(0, m + 0.8 - 0.65)]
    got = triplet_ranking(torch.tensor(SCORES), LABELS, m, hard_negative=True, hard_pool_size=1)
    assert got.item() == pytest.approx(sum(t2v) / 4 + sum(v2t) / 3, rel=1e-12)


def test_triplet_single_video_batch_is_zero_and_keeps_the_graph() -> None:
    scores = torch.tensor([[0.3], [0.1]], requires_grad=True)
    loss = triplet_ranking(scores, torch.tensor([0, 0]), 0.2, True, 20)
    loss.backward()
    assert loss.item() == 0.0 and scores.grad is not None


def test_t2v_hard_sampling_stays_in_the_pool_and_random_covers_all() -> None:
    n_videos, pool = 40, 20
    scores = torch.arange(n_videos, dtype=torch.float64).flip(0).repeat(200, 1)  # video v scores 39 - v
    labels = torch.zeros(200, dtype=torch.long)  # positive = video 0, negatives ranked 1..39 = video index
    g = torch.Generator().manual_seed(0)
    hard = _t2v_negatives(scores, labels, True, pool, g)
    hard_videos = set((n_videos - 1 - hard).long().tolist())
    assert hard_videos <= set(range(1, pool + 1)) and len(hard_videos) > pool // 2
    rand_videos = set((n_videos - 1 - _t2v_negatives(scores, labels, False, pool, g)).long().tolist())
    assert rand_videos <= set(range(1, n_videos)) and max(rand_videos) > pool


def test_v2t_hard_takes_the_max_and_random_varies() -> None:
    rng = np.random.default_rng(3)
    scores = torch.tensor(rng.normal(size=(12, 3)))
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    positives = positive_mask(labels, 3)
    hard = _v2t_negatives(scores, positives, True, None)
    expected = scores.masked_fill(positives, -np.inf).max(dim=0).values
    assert torch.equal(hard, expected)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([_v2t_negatives(scores, positives, False, g) for _ in range(200)])
    for v in range(3):
        negatives = set(scores[~positives[:, v], v].tolist())
        assert set(draws[:, v].tolist()) == negatives  # uniform over all 8 negatives, never a positive


def test_sampling_is_deterministic_given_the_generator() -> None:
    scores = torch.tensor(np.random.default_rng(4).normal(size=(30, 10)))
    labels = torch.arange(30) % 10
    a = triplet_ranking(scores, labels, 0.2, False, 20, torch.Generator().manual_seed(7))
    b = triplet_ranking(scores, labels, 0.2, False, 20, torch.Generator().manual_seed(7))
    assert a.item() == b.item()


def test_query_diverse_by_hand() -> None:
    q = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    delta, alpha = 0.2, 32.0
    c23 = 1 / math.sqrt(2)
    per_query = [
        math.log(1 + math.exp(alpha * (0.0 + delta))),  # q0 vs q1: orthogonal
        math.log(1 + math.exp(alpha * (0.0 + delta))),
        math.log(1 + math.exp(alpha * (c23 + delta))),  # q2 vs q3: 45 degrees
        math.log(1 + math.exp(alpha * (c23 + delta))),
    ]
    got = query_diverse(q, labels, delta, alpha)
    assert got.item() == pytest.approx(sum(per_query) / 4, rel=1e-6)
    # a query alone in its video contributes log(1 + 0) = 0
    assert query_diverse(q[:3], torch.tensor([0, 1, 2]), delta, alpha).item() == 0.0


def test_total_loss_weights_and_logged_terms() -> None:
    cfg = MamFusionConfig(loss_factor=(0.5, 0.25, 0.125), margin=0.2, hard_pool_size=1)
    s = torch.tensor(SCORES, dtype=torch.float32)
    queries = torch.tensor(np.random.default_rng(5).normal(size=(4, 8)), dtype=torch.float32)
    out = MamFusionOutput(s, 2 * s, s.flip(1), 3 * s, queries)
    total, terms = MamFusionLoss(cfg)(out, LABELS.tolist(), hard_negative=True)
    expected = (
        0.5 * info_nce(2 * s, LABELS)
        + triplet_ranking(s, LABELS, 0.2, True, 1)
        + 0.25 * info_nce(3 * s, LABELS)
        + triplet_ranking(s.flip(1), LABELS, 0.2, True, 1)
        + 0.125 * query_diverse(queries, LABELS, 0.2, 32.0)
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(terms) == {"clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "total"}
    assert sum(v for k, v in terms.items() if k != "total") == pytest.approx(terms["total"], rel=1e-6)


def test_video_without_queries_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"videos \[1\]"):
        info_nce(torch.zeros(2, 3), torch.tensor([0, 2]))
