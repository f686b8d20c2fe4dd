"""R@K / SumR correctness: hand-built matrices (ties included) and the real Charades-STA test layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.metrics import (
    best_positive_ranks,
    chance_hit_rate,
    chance_table,
    format_metrics,
    positive_mask,
    rank_bounds,
    recall_table,
    summarize,
)


def test_hand_built_ranks_and_ties():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.0],  # positive 0 is the top -> rank 1
            [0.9, 0.5, 0.1, 0.0],  # positive 2: two videos strictly above -> rank 3
            [0.5, 0.5, 0.5, 0.5],  # all tied, positive 1: the 3 tied negatives count (pessimistic) -> 4
            [0.2, 0.7, 0.7, 0.1],  # positive 1 ties with negative 2 -> rank 2
        ]
    )
    positive = positive_mask([[0], [2], [1], [1]], 4)
    assert best_positive_ranks(scores, positive).tolist() == [1, 3, 4, 2]


def test_several_positives_best_counts_and_other_positives_ignored():
    scores = torch.tensor([[0.3, 0.9, 0.8, 0.1], [0.4, 0.4, 0.2, 0.9]])
    # row 0: positives {2, 3}: best is 2 (0.8); only video 1 is above -> rank 2
    # row 1: positives {0, 1} tie at 0.4; only negative 3 is above -> rank 2 (a tied positive is no negative)
    positive = positive_mask([[2, 3], [0, 1]], 4)
    assert best_positive_ranks(scores, positive).tolist() == [2, 2]


def test_rows_without_positive_and_shape_mismatch_are_errors():
    with pytest.raises(ValueError, match="at least one positive"):
        best_positive_ranks(torch.zeros(2, 3), positive_mask([[0], []], 3))
    with pytest.raises(ValueError, match="differ"):
        best_positive_ranks(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))


def _summary(ranks, n_videos=200, optimistic=None):
    ranks = np.asarray(ranks)
    return summarize(
        ranks,
        ranks if optimistic is None else np.asarray(optimistic),
        split="test",
        n_videos=n_videos,
        n_positives=[1] * len(ranks),
    )


def test_recall_metrics_exact_values():
    m = _summary([1, 2, 5, 6, 10, 11, 100, 101])
    assert m.r1 == pytest.approx(12.5)
    assert m.r5 == pytest.approx(37.5)
    assert m.r10 == pytest.approx(62.5)
    assert m.r100 == pytest.approx(87.5)
    assert m.sumr == pytest.approx(12.5 + 37.5 + 62.5 + 87.5)
    assert m.medr == pytest.approx(8.0)
    assert m.n_queries == 8 and m.n_videos == 200
    with pytest.raises(ValueError):
        _summary([])


def test_nan_scores_never_rank_well():
    """An all-NaN model, a NaN positive, or one NaN video must not lift any query to rank 1."""
    positive = positive_mask([[0], [1], [2]], 4)
    all_nan = torch.full((3, 4), float("nan"))
    assert best_positive_ranks(all_nan, positive).tolist() == [4, 4, 4]
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.9, 0.5, 0.2, 0.3], [0.1, 0.2, 0.8, 0.3]])
    assert best_positive_ranks(scores, positive).tolist() == [1, 2, 1]
    scores[:, 3] = float("nan")  # one stored video filled with NaN: worse for everyone, never better
    assert best_positive_ranks(scores, positive).tolist() == [2, 3, 2]
    scores[0, 0] = float("nan")  # a NaN positive is the worst possible
    assert best_positive_ranks(scores, positive)[0] == 4


def test_rank_bounds_on_ties():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.9, 0.2, 0.2, 0.1]])
    pessimistic, optimistic = rank_bounds(scores, positive_mask([[1], [2]], 4))
    assert pessimistic.tolist() == [3, 3] and optimistic.tolist() == [1, 2]
    m = summarize(pessimistic.numpy(), optimistic.numpy(), split="val", n_videos=4, n_positives=[1, 1])
    assert m.tied_queries == 2
    assert m.r1 == 0.0 and m.optimistic is not None and m.optimistic.r1 == 50.0
    assert "2 queries tie" in format_metrics(m)


def test_chance_levels_and_trivial_ks():
    assert chance_hit_rate(30, 1, 1) == pytest.approx(1 / 30)
    assert chance_hit_rate(30, 1, 10) == pytest.approx(10 / 30)
    assert chance_hit_rate(6, 1, 5) == pytest.approx(5 / 6)
    assert chance_hit_rate(6, 1, 10) == 1.0
    assert chance_hit_rate(10, 2, 1) == pytest.approx(2 / 10)
    assert chance_hit_rate(10, 2, 2) == pytest.approx(1 - (8 * 7) / (10 * 9))
    table = chance_table(6, [1, 1, 1])
    assert table.r10 == table.r100 == 100.0 and table.r1 == pytest.approx(100 / 6)
    m = _summary([1, 2, 3], n_videos=6)
    assert m.trivial_ks == [10, 100]
    text = format_metrics(m)
    assert "3 queries vs a gallery of 6 videos" in text
    assert "R@10 100.00 [chance 100.00] (trivial: K >= gallery)" in text


def test_chance_matches_a_simulated_random_ranking():
    rng = np.random.default_rng(0)
    n_videos, n_pos, trials = 40, 3, 20000
    hits = {k: 0 for k in (1, 5, 10)}
    for _ in range(trials):
        best = int(rng.permutation(n_videos)[:n_pos].min()) + 1
        for k in hits:
            hits[k] += best <= k
    for k, h in hits.items():
        assert h / trials == pytest.approx(chance_hit_rate(n_videos, n_pos, k), abs=0.015)


def test_recall_table_counts_at_k():
    t = recall_table(np.array([1, 5, 6]))
    assert (t.r1, t.r5, t.r10) == pytest.approx((100 / 3, 200 / 3, 100.0))


@pytest.fixture(scope="module")
def charades_layout(realdata):
    from storage.annotations import read_annotations

    ann = read_annotations(realdata / "annotations" / "charades_sta_test.txt")
    videos = ann.video_ids()
    index = {v: i for i, v in enumerate(videos)}
    targets = torch.tensor([index[q.video_id] for q in ann.queries])
    return targets, len(videos)


def test_charades_layout_sizes(charades_layout):
    targets, n_videos = charades_layout
    assert (len(targets), n_videos) == (3720, 1334)


def test_oracle_scores_give_100_everywhere(charades_layout):
    targets, n_videos = charades_layout
    scores = torch.rand(len(targets), n_videos, generator=torch.Generator().manual_seed(0))
    scores[torch.arange(len(targets)), targets] = 2.0  # the correct video beats every other
    positive = positive_mask([[int(t)] for t in targets], n_videos)
    m = _summary(best_positive_ranks(scores, positive), n_videos)
    assert [m.r1, m.r5, m.r10, m.r100, m.sumr] == [100.0, 100.0, 100.0, 100.0, 400.0]


def test_uniform_random_scores_match_chance(charades_layout):
    """Over 5 seeds, R@K is within 4 binomial standard errors of 100*K/n_videos."""
    targets, n_videos = charades_layout
    positive = positive_mask([[int(t)] for t in targets], n_videos)
    seeds = range(5)
    per_seed = []
    for seed in seeds:
        scores = torch.rand(len(targets), n_videos, generator=torch.Generator().manual_seed(seed))
        per_seed.append(_summary(best_positive_ranks(scores, positive), n_videos))
    n = len(targets) * len(seeds)
    for k in (1, 5, 10, 100):
        p = k / n_videos
        mean = float(np.mean([getattr(m, f"r{k}") for m in per_seed]))
        tol = 4 * 100 * math.sqrt(p * (1 - p) / n)
        assert abs(mean - 100 * p) <= tol, (k, mean, 100 * p, tol)
        assert getattr(per_seed[0].chance, f"r{k}") == pytest.approx(100 * p)
