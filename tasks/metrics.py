"""Retrieval metrics of MODEL_SPEC §10, with what they mean: gallery size, chance level and ties.

Rank rule: a query's rank is 1 + the number of *non-positive* videos scoring greater than or equal to its best
positive (pessimistic), so a model that gives every video the same score gets the worst rank, never free
credit. NaN never ranks well: a NaN positive counts as -inf and a NaN negative as +inf. The optimistic bound
(only strictly greater negatives count) is reported beside it when ties exist; the official code's unstable
`argsort` lands anywhere between the two. With several positives per query the best one counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from storage.registry import RecallTable, RetrievalMetrics

RECALL_KS: tuple[int, ...] = (1, 5, 10, 100)


def positive_mask(
    positives: Sequence[Sequence[int]], n_videos: int, device: torch.device | None = None
) -> torch.Tensor:
    """Dense (n_queries, n_videos) bool mask from per-query lists of positive video indices."""
    rows = [q for q, pos in enumerate(positives) for _ in pos]
    cols = [v for pos in positives for v in pos]
    mask = torch.zeros(len(positives), n_videos, dtype=torch.bool, device=device)
    mask[
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols, dtype=torch.long, device=device),
    ] = True
    return mask


def rank_bounds(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pessimistic, optimistic) 1-based ranks of each row's best positive; see the module docstring.

    `scores` and `positive` are (n_queries, n_videos); every row needs at least one positive.
    """
    if scores.shape != positive.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive mask {tuple(positive.shape)} differ")
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every query needs at least one positive video in the gallery")
    nan = torch.isnan(scores)
    s = scores.masked_fill(nan & positive, float("-inf")).masked_fill(nan & ~positive, float("inf"))
    best = s.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    negative = ~positive
    pessimistic = 1 + ((s >= best) & negative).sum(dim=1)
    optimistic = 1 + ((s > best) & negative).sum(dim=1)
    return pessimistic, optimistic


def best_positive_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of each row's best positive (the one every reported R@K uses)."""
    return rank_bounds(scores, positive)[0]


def recall_table(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS) -> RecallTable:
    r = np.asarray(ranks, dtype=np.float64)
    values = {f"r{k}": float((r <= k).mean() * 100.0) for k in ks}
    return RecallTable(**values, sumr=sum(values.values()))


def chance_hit_rate(n_videos: int, n_positives: int, k: int) -> float:
    """P(at least one of `n_positives` lands in the top `k` of a uniformly random ranking of `n_videos`)."""
    if k >= n_videos - n_positives + 1:
        return 1.0
    miss = 1.0
    for i in range(k):  # C(N-P, K) / C(N, K) as a product, exact enough and overflow-free
        miss *= (n_videos - n_positives - i) / (n_videos - i)
    return 1.0 - miss


def chance_table(n_videos: int, n_positives: Sequence[int], ks: Sequence[int] = RECALL_KS) -> RecallTable:
    """Expected R@K (percent) of a random ranking, averaged over the queries' positive counts."""
    counts = np.bincount(np.asarray(n_positives, dtype=np.int64))
    weights = {p: c / counts.sum() for p, c in enumerate(counts) if c}
    values = {
        f"r{k}": 100.0 * sum(w * chance_hit_rate(n_videos, p, k) for p, w in weights.items()) for k in ks
    }
    return RecallTable(**values, sumr=sum(values.values()))


def summarize(
    ranks: np.ndarray,
    optimistic_ranks: np.ndarray,
    *,
    split: str,
    n_videos: int,
    n_positives: Sequence[int],
    n_distractors: int = 0,
) -> RetrievalMetrics:
    """The full metrics record: R@K, MedR/MeanR, chance, trivially-100 Ks and the tie bound."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks to summarise")
    optimistic_ranks = np.asarray(optimistic_ranks)
    table = recall_table(ranks)
    tied = int((optimistic_ranks != ranks).sum())
    return RetrievalMetrics(
        split=split,
        gallery="extended" if n_distractors else "split",
        n_videos=n_videos,
        n_distractors=n_distractors,
        n_queries=int(ranks.size),
        **table.model_dump(),
        medr=float(np.median(ranks)),
        meanr=float(ranks.mean()),
        chance=chance_table(n_videos, n_positives),
        chance_medr=float(math.ceil((n_videos + 1) / 2)),
        trivial_ks=[k for k in RECALL_KS if k >= n_videos],
        tied_queries=tied,
        optimistic=recall_table(optimistic_ranks) if tied else None,
    )


def describe_gallery(m: RetrievalMetrics) -> str:
    """'split test: 18 queries vs 30 videos (6 in the split + 24 distractors)'."""
    extra = f" ({m.n_videos - m.n_distractors} in the split + {m.n_distractors} distractors)"
    return f"split {m.split}: {m.n_queries} queries vs a gallery of {m.n_videos} videos" + (
        extra if m.n_distractors else ""
    )


def format_metrics(m: RetrievalMetrics) -> str:
    """Two lines for a terminal: the gallery, then each R@K beside chance (trivial ones marked)."""
    cells = []
    for k in RECALL_KS:
        mark = " (trivial: K >= gallery)" if k in m.trivial_ks else ""
        cells.append(f"R@{k} {getattr(m, f'r{k}'):.2f} [chance {getattr(m.chance, f'r{k}'):.2f}]{mark}")
    lines = [describe_gallery(m), "  ".join(cells) + f"  SumR {m.sumr:.2f} [chance {m.chance.sumr:.2f}]"]
    if m.moments is not None:
        mm = m.moments
        lines.append(
            f"moments ({mm.n_queries} queries, true length {mm.mean_true_length:.1f} s): mean IoU "
            f"{mm.span.mean_iou:.3f}, R@1 IoU>=0.5 {mm.span.r1_iou5:.2f} "
            f"[single clip {mm.single_clip.mean_iou:.3f}, {mm.single_clip.r1_iou5:.2f}; "
            f"chance {mm.chance.mean_iou:.3f}, {mm.chance.r1_iou5:.2f}]"
        )
    if m.tied_queries:
        o = m.optimistic
        assert o is not None
        lines.append(
            f"{m.tied_queries} queries tie with a negative: optimistic R@1 {o.r1:.2f} SumR {o.sumr:.2f} "
            "(reported numbers count ties against the model)"
        )
    return "\n".join(lines)
