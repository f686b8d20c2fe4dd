"""Training losses of MODEL_SPEC §6: InfoNCE on raw scores, triplet ranking on cosines, query-diverse loss.

A batch is B_v videos with all their captions; `labels[i]` is the index of query i's video. Every video
must own at least one query (the official collate guarantees it). Negative sampling draws from an explicit
(CPU) `torch.Generator` so runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import MamFusionConfig
from models.mamfusion import MamFusionOutput


def positive_mask(labels: Tensor, n_videos: int) -> Tensor:
    """(B_q, B_v) bool: query i belongs to video v. Rejects videos without queries (no defined positive)."""
    mask = labels[:, None] == torch.arange(n_videos, device=labels.device)
    empty = (~mask.any(dim=0)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"videos {empty} of the batch have no query; every video needs at least one caption")
    return mask


def info_nce(raw_scores: Tensor, labels: Tensor) -> Tensor:
    """t2v cross-entropy over the videos + v2t multi-positive term over the queries (temperature 1)."""
    positives = positive_mask(labels, raw_scores.shape[1])
    t2v = F.cross_entropy(raw_scores, labels)
    v2t_all = raw_scores.logsumexp(dim=0)
    v2t_pos = raw_scores.masked_fill(~positives, float("-inf")).logsumexp(dim=0)
    return t2v + (v2t_all - v2t_pos).mean()


def _v2t_negatives(
    scores: Tensor, positives: Tensor, hard: bool, generator: torch.Generator | None
) -> Tensor:
    """Per video: its hardest negative query (hard) or a uniformly random one."""
    ranked = scores.detach().masked_fill(positives, float("-inf")).sort(dim=0, descending=True).indices
    n_neg = (~positives).sum(dim=0)
    if hard:
        rank = torch.zeros_like(n_neg)
    else:
        u = torch.rand(n_neg.shape, generator=generator).to(scores.device)
        rank = torch.minimum((u * n_neg).long(), n_neg - 1)
    pick = ranked.gather(0, rank[None])
    return scores.gather(0, pick).squeeze(0)


def _t2v_negatives(
    scores: Tensor, labels: Tensor, hard: bool, hard_pool_size: int, generator: torch.Generator | None
) -> Tensor:
    """Per query: a random one of its `hard_pool_size` top-scoring negative videos (hard) or of all."""
    n_videos = scores.shape[1]
    ranked = scores.detach().scatter(1, labels[:, None], float("inf")).sort(dim=1, descending=True).indices
    high = min(1 + hard_pool_size, n_videos) if hard else n_videos
    rank = torch.randint(1, high, (scores.shape[0],), generator=generator).to(scores.device)
    return scores.gather(1, ranked.gather(1, rank[:, None])).squeeze(1)


def triplet_ranking(
    scores: Tensor,
    labels: Tensor,
    margin: float,
    hard_negative: bool,
    hard_pool_size: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hinge ranking loss on cosine scores, t2v mean + v2t mean (the official `get_clip_triplet_loss`).

    v2t: positive = mean score of the video's own queries, negative = the hardest other query when mining,
    else a random one. t2v: negative = random among the 20 hardest videos when mining, else among all. A batch
    with a single video has no negatives and contributes 0.
    """
    n_queries, n_videos = scores.shape
    if n_videos < 2:
        return scores.sum() * 0.0
    positives = positive_mask(labels, n_videos)
    v2t_pos = (scores * positives).sum(dim=0) / positives.sum(dim=0)
    v2t_neg = _v2t_negatives(scores, positives, hard_negative, generator)
    v2t = (margin + v2t_neg - v2t_pos).clamp(min=0).sum() / n_videos
    t2v_pos = scores.gather(1, labels[:, None]).squeeze(1)
    t2v_neg = _t2v_negatives(scores, labels, hard_negative, hard_pool_size, generator)
    t2v = (margin + t2v_neg - t2v_pos).clamp(min=0).sum() / n_queries
    return t2v + v2t


def query_diverse(queries: Tensor, labels: Tensor, delta: float, alpha: float) -> Tensor:
    """Push apart captions of the same video: mean_j log(1 + sum_{i~j, i!=j} exp(alpha (cos_ij + delta)))."""
    x = F.normalize(queries, dim=-1)
    cos = x @ x.T
    same_video = (labels[:, None] == labels[None, :]) & ~torch.eye(
        len(labels), dtype=torch.bool, device=x.device
    )
    pushed = torch.where(same_video, torch.exp(alpha * (cos + delta)), torch.zeros_like(cos)).sum(dim=0)
    return torch.log1p(pushed).mean()


class MamFusionLoss(nn.Module):
    """L = l1*NCE_clip + Trip_clip + l2*NCE_frame + Trip_frame + l3*QDL, with (l1, l2, l3) = `loss_factor`."""

    def __init__(self, config: MamFusionConfig) -> None:
        super().__init__()
        self.config = config

    def forward(
        self,
        output: MamFusionOutput,
        query_labels: Tensor | Sequence[int],
        hard_negative: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Total loss and each weighted term (as it enters the total) for logging."""
        cfg = self.config
        labels = torch.as_tensor(query_labels, dtype=torch.long, device=output.clip_scores.device)
        l_clip, l_frame, l_qdl = cfg.loss_factor

        def trip(scores: Tensor) -> Tensor:
            return triplet_ranking(scores, labels, cfg.margin, hard_negative, cfg.hard_pool_size, generator)

        terms = {
            "clip_nce": l_clip * info_nce(output.clip_scores_raw, labels),
            "clip_trip": trip(output.clip_scores),
            "frame_nce": l_frame * info_nce(output.frame_scores_raw, labels),
            "frame_trip": trip(output.frame_scores),
            "qdl": l_qdl * query_diverse(output.diverse_queries, labels, *cfg.neg_factor),
        }
        total = torch.stack(list(terms.values())).sum()
        logged = {name: float(value.detach()) for name, value in terms.items()}
        logged["total"] = float(total.detach())
        return total, logged
