"""Moment localisation: the span of a video that matches a query, from its per-clip score profile.

The model scores each of a video's 32 clips against the query (cosine of L2-normalised vectors). The best
clip alone is 0.5-1.5 s on typical videos while real moments run 5-30 s, so the `grow` rule starts at the
peak clip and extends over neighbours whose score stays within `margin` of the peak, measured relative to
the profile's spread: a neighbour is kept while score >= peak - margin * (peak - median). `single-clip` is
the baseline the rule is measured against (BENCHMARKS.md, "Moments").

Moment metrics follow VCMR practice: temporal IoU of the predicted span with the annotated one, in the
correct video (localisation alone) and in the top-ranked video (retrieval and localisation: 0 when the top
video is wrong), as mean IoU and R@1 at IoU >= 0.3/0.5/0.7; chance is a random span of the mean true length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from storage.registry import MomentMetrics, MomentTable

IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)
DEFAULT_MARGIN = 0.8  # best mean IoU on the demo corpus validation split: BENCHMARKS.md, "Moments"


@dataclass(frozen=True)
class SpanRule:
    """How a span is read off a clip-score profile."""

    kind: Literal["grow", "single-clip"] = "grow"
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"span margin must be in [0, 1], got {self.margin}")


SINGLE_CLIP = SpanRule("single-clip", 0.0)


def clip_range(profile: np.ndarray, rule: SpanRule) -> tuple[int, int]:
    """(first, last) clip index of the span: the peak, grown over neighbours above the rule's threshold."""
    p = np.asarray(profile, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"a score profile is a non-empty 1-D array, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("the score profile has non-finite values")
    peak = int(p.argmax())
    if rule.kind == "single-clip":
        return peak, peak
    threshold = p[peak] - rule.margin * (p[peak] - float(np.median(p)))
    lo = hi = peak
    while lo > 0 and p[lo - 1] >= threshold:
        lo -= 1
    while hi < p.size - 1 and p[hi + 1] >= threshold:
        hi += 1
    return lo, hi


def localize(profile: np.ndarray, spans: np.ndarray, rule: SpanRule) -> tuple[float, float]:
    """(start, end) seconds of the span for a (n_clips,) profile over (n_clips, 2) clip spans."""
    lo, hi = clip_range(profile, rule)
    return float(spans[lo, 0]), float(spans[hi, 1])


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """|a ∩ b| / |a ∪ b| of two [start, end] intervals (0 for disjoint or degenerate ones)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def moment_table(ious: Sequence[float]) -> MomentTable:
    values = np.asarray(ious, dtype=np.float64)
    return MomentTable(
        mean_iou=float(values.mean()),
        **{f"r1_iou{int(t * 10)}": float((values >= t).mean() * 100.0) for t in IOU_THRESHOLDS},
    )


def chance_ious(
    truths: Sequence[tuple[float, float]], durations: Sequence[float], n_draws: int = 64
) -> np.ndarray:
    """(n_queries * n_draws) IoUs of random spans of the mean true length, placed uniformly in each video
    (seeded, so the chance row is reproducible)."""
    rng = np.random.default_rng(0)
    length = float(np.mean([e - s for s, e in truths]))
    out = []
    for (s, e), duration in zip(truths, durations, strict=True):
        span = min(length, duration)
        starts = rng.uniform(0.0, max(duration - span, 0.0), n_draws)
        out.extend(temporal_iou((x, x + span), (s, e)) for x in starts)
    return np.asarray(out)


def moment_metrics(
    truths: Sequence[tuple[float, float]],
    durations: Sequence[float],
    correct: Sequence[tuple[np.ndarray, np.ndarray]],
    top1_correct: Sequence[bool],
    rule: SpanRule,
) -> MomentMetrics:
    """Moment quality of `rule` beside the single-clip baseline and chance.

    `correct[i]` is (profile, clip spans) of query i's correct video; `top1_correct[i]` whether retrieval put
    it first (the top-ranked video's moment counts only then).
    """
    rows = {}
    for name, r in (("span", rule), ("single_clip", SINGLE_CLIP)):
        ious = np.array(
            [temporal_iou(localize(p, s, r), t) for (p, s), t in zip(correct, truths, strict=True)]
        )
        rows[name] = moment_table(ious)
        rows[f"{name}_top1"] = moment_table(ious * np.asarray(top1_correct, dtype=np.float64))
    return MomentMetrics(
        n_queries=len(truths),
        rule=f"{rule.kind} (margin {rule.margin:g})",
        mean_true_length=float(np.mean([e - s for s, e in truths])),
        **rows,
        chance=moment_table(chance_ious(truths, durations)),
    )
