"""Moment localisation: temporal IoU, the span rule on constructed score profiles, and the moment metrics."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.moments import (
    SINGLE_CLIP,
    SpanRule,
    chance_ious,
    clip_range,
    localize,
    moment_metrics,
    temporal_iou,
)

SPANS = np.stack([np.arange(8.0), np.arange(1.0, 9.0)], axis=1)  # 8 clips of 1 s each


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ((0, 10), (0, 10), 1.0),
        ((0, 10), (5, 15), 5 / 15),
        ((0, 4), (1, 2), 1 / 4),
        ((0, 1), (2, 3), 0.0),
        ((0, 1), (1, 2), 0.0),  # touching, no overlap
        ((2, 2), (0, 4), 0.0),  # degenerate
        ((24.3, 30.4), (25.0, 26.0), 1.0 / 6.1),
    ],
)
def test_temporal_iou(a, b, iou):
    assert temporal_iou(a, b) == pytest.approx(iou)
    assert temporal_iou(b, a) == pytest.approx(iou)


def test_grow_rule_covers_a_plateau_and_stops_at_the_drop():
    profile = np.array([0.1, 0.1, 0.5, 0.8, 0.9, 0.7, 0.1, 0.1])
    assert clip_range(profile, SINGLE_CLIP) == (4, 4)
    # median 0.3; margin 0.5: threshold 0.9 - 0.5 * 0.6 = 0.6 -> clips 3..5
    assert clip_range(profile, SpanRule("grow", 0.5)) == (3, 5)
    assert localize(profile, SPANS, SpanRule("grow", 0.5)) == (3.0, 6.0)
    # a wider margin takes the 0.5 clip too; margin 0 is the single clip; margin 1 grows to the median
    assert clip_range(profile, SpanRule("grow", 0.7)) == (2, 5)
    assert clip_range(profile, SpanRule("grow", 0.0)) == (4, 4)
    assert clip_range(profile, SpanRule("grow", 1.0)) == (2, 5)


def test_grow_rule_does_not_jump_gaps_and_handles_edges_and_flat_profiles():
    profile = np.array([0.9, 0.85, 0.1, 0.88, 0.1, 0.1, 0.1, 0.1])
    assert clip_range(profile, SpanRule("grow", 0.5)) == (0, 1)  # the 0.88 clip is beyond a gap
    assert clip_range(np.full(8, 0.3), SpanRule("grow", 0.5)) == (0, 7)  # no evidence of where: everything
    assert clip_range(np.array([0.2]), SpanRule()) == (0, 0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_range(np.array([0.1, np.nan]), SpanRule())
    with pytest.raises(ValueError, match="margin"):
        SpanRule("grow", 1.5)


def test_moment_metrics_span_beats_single_clip_on_long_moments():
    rng = np.random.default_rng(0)
    truths, correct, durations = [], [], []
    for _ in range(50):
        start = int(rng.integers(0, 4))
        truths.append((float(start), float(start + 4)))  # 4 s moments in an 8 s video
        profile = rng.normal(0.0, 0.02, 8)
        profile[start : start + 4] += 0.6
        correct.append((profile, SPANS))
        durations.append(8.0)
    top1 = [True] * 25 + [False] * 25
    m = moment_metrics(truths, durations, correct, top1, SpanRule("grow", 0.5))
    assert m.n_queries == 50 and m.mean_true_length == 4.0
    assert m.span.mean_iou == pytest.approx(1.0) and m.span.r1_iou7 == 100.0
    assert m.single_clip.mean_iou == pytest.approx(0.25) and m.single_clip.r1_iou3 == 0.0
    assert m.span_top1.r1_iou5 == 50.0  # the moment in the top-ranked video counts only when it is correct
    assert 0.0 < m.chance.mean_iou < m.span.mean_iou


def test_chance_spans_are_reproducible_and_sensible():
    truths = [(0.0, 4.0), (2.0, 6.0)]
    a = chance_ious(truths, [8.0, 8.0])
    assert a.shape == (128,) and np.array_equal(a, chance_ious(truths, [8.0, 8.0]))
    assert a.min() >= 0.0 and a.max() <= 1.0 and 0.2 < a.mean() < 0.7
    # a moment covering the whole video: any random span of that length matches it exactly
    assert chance_ious([(0.0, 8.0)], [8.0]).min() == pytest.approx(1.0)
