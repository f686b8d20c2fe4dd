"""R@K / SumR correctness: hand-built matrices (ties included) and the real Charades-STA test layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.metrics import best_positive_ranks, positive_mask, recall_metrics


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


def test_recall_metrics_exact_values():
    m = recall_metrics([1, 2, 5, 6, 10, 11, 100, 101])
    assert m["r1"] == pytest.approx(12.5)
    assert m["r5"] == pytest.approx(37.5)
    assert m["r10"] == pytest.approx(62.5)
    assert m["r100"] == pytest.approx(87.5)
    assert m["sumr"] == pytest.approx(12.5 + 37.5 + 62.5 + 87.5)
    assert m["medr"] == pytest.approx(8.0)
    assert m["n_queries"] == 8
    with pytest.raises(ValueError):
        recall_metrics([])


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
    m = recall_metrics(best_positive_ranks(scores, positive))
    assert [m["r1"], m["r5"], m["r10"], m["r100"], m["sumr"]] == [100.0, 100.0, 100.0, 100.0, 400.0]


def test_uniform_random_scores_match_chance(charades_layout):
    """Over 5 seeds, R@K is within 4 binomial standard errors of 100*K/n_videos."""
    targets, n_videos = charades_layout
    positive = positive_mask([[int(t)] for t in targets], n_videos)
    seeds = range(5)
    per_seed = []
    for seed in seeds:
        scores = torch.rand(len(targets), n_videos, generator=torch.Generator().manual_seed(seed))
        per_seed.append(recall_metrics(best_positive_ranks(scores, positive)))
    n = len(targets) * len(seeds)
    for k in (1, 5, 10, 100):
        p = k / n_videos
        mean = float(np.mean([m[f"r{k}"] for m in per_seed]))
        tol = 4 * 100 * math.sqrt(p * (1 - p) / n)
        assert abs(mean - 100 * p) <= tol, (k, mean, 100 * p, tol)
