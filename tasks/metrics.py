"""Retrieval metrics of MODEL_SPEC §10, computed with batched tensor ops (no per-query loop over videos).

Tie rule (pessimistic): a query's rank is 1 + the number of *non-positive* videos whose score is greater
than **or equal to** the best positive's score. A model that gives every video the same score therefore gets
the worst possible rank, never free credit. With several positive videos per query, the best-scoring positive
counts and the other positives are never counted against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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


def best_positive_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (1-based, long) of each row's best positive under the pessimistic tie rule.

    `scores` and `positive` are (n_queries, n_videos); every row needs at least one positive.
    """
    if scores.shape != positive.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive mask {tuple(positive.shape)} differ")
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every query needs at least one positive video in the gallery")
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return 1 + ((scores >= best) & ~positive).sum(dim=1)


def recall_metrics(
    ranks: torch.Tensor | np.ndarray | Sequence[int], ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """R@K in percent for each K, plus `sumr` (their sum), `medr`, `meanr` and `n_queries`."""
    r = torch.as_tensor(np.asarray(ranks), dtype=torch.float64)
    if r.numel() == 0:
        raise ValueError("no ranks to summarise")
    out = {f"r{k}": float((r <= k).double().mean() * 100.0) for k in ks}
    out["sumr"] = sum(out[f"r{k}"] for k in ks)
    out["medr"] = float(np.median(r.numpy()))
    out["meanr"] = float(r.mean())
    out["n_queries"] = int(r.numel())
    return out


def format_metrics(metrics: dict[str, float]) -> str:
    """One human-readable line: R@1 .. R@100 and SumR."""
    return "  ".join(f"R@{k} {metrics[f'r{k}']:.2f}" for k in RECALL_KS) + f"  SumR {metrics['sumr']:.2f}"
