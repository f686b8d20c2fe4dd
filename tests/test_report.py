"""The run report: per-query JSONL, PNG plots, gallery/chance/ties stated, worst queries listed."""

from __future__ import annotations

import json
import re

import numpy as np

from models.config import load_preset
from storage.registry import RunDir, RunMetrics, Skipped, TrainingSummary
from tasks.metrics import summarize
from tasks.report import worst_queries, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(n: int) -> list[dict]:
    return [
        {
            "epoch": e + 1,
            "train": {"clip_nce": 1.0 / (e + 1), "qdl": 0.1, "total": 2.0 / (e + 1)},
            "val": {
                "r1": 5.0 * e,
                "r5": 10.0 * e,
                "r10": 15.0 * e,
                "r100": 50.0 + e,
                "sumr": 30.0 * e + 50.0 + e,
            },
            "best": e == n - 2,
        }
        for e in range(n)
    ]


def _per_query(ranks: list[int]) -> list[dict]:
    return [
        {
            "query_id": f"v{i}#enc#0",
            "text": f"caption {i} | with a pipe",
            "video_id": f"v{i}",
            "rank": r,
            "top_video_ids": [f"v{(i + k) % 7}" for k in range(1, 11)],
            "top_scores": [1.0 - k / 10 for k in range(10)],
            "best_clip": {"video_id": f"v{i}", "clip": 3, "start": 1.5, "end": 2.5},
        }
        for i, r in enumerate(ranks)
    ]


def test_worst_queries_order():
    rows = _per_query([3, 1, 9, 9, 2])
    assert [(r["rank"], r["query_id"]) for r in worst_queries(rows, 3)] == [
        (9, "v2#enc#0"),
        (9, "v3#enc#0"),
        (3, "v0#enc#0"),
    ]


def _metrics(ranks: list[int], n_videos: int, split: str = "test", distractors: int = 0) -> RunMetrics:
    base = summarize(
        np.array(ranks),
        np.array(ranks),
        split=split,
        n_videos=n_videos,
        n_positives=[1] * len(ranks),
        n_distractors=distractors,
    )
    summary = TrainingSummary(
        best_epoch=4,
        best_val_sumr=120.0,
        epochs_run=5,
        stopped_early=False,
        validation_gallery="4 queries vs 9 videos",
        warnings=["validation has 4 queries over 9 videos"],
    )
    return RunMetrics(**base.model_dump(), training=summary)


def test_write_report_is_self_contained(tmp_path):
    cfg = load_preset("demo")
    run = RunDir(tmp_path).create()
    metrics = _metrics([3, 1, 9, 7, 2], 7)
    per_query = _per_query([3, 1, 9, 7, 2])
    skipped = [Skipped(kind="video", id="broken", reason="no features under visual fingerprint x")]
    report = write_report(run, cfg, metrics, _history(5), per_query, skipped, title="captions.csv", n_worst=2)

    lines = run.per_query_file.read_text().splitlines()
    assert [json.loads(line) for line in lines] == per_query
    text = report.read_text()
    assert text.startswith("# MamFusion: captions.csv\n")
    assert "5 queries ranked against a gallery of **7 videos** (the split's own 7 videos)" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(images) == ["plots/ranks.png", "plots/train_loss.png", "plots/val_recall.png"]
    for rel in images:
        data = (tmp_path / rel).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, rel
    # R@10 and R@100 with a 7-video gallery are trivially 100: marked, and chance is shown beside
    assert "| model | 20.00 | 60.00 | 100.00† | 100.00† | 280.00 | 3 |" in text
    assert "| chance (random ranking) | 14.29 | 71.43 | 100.00† | 100.00† | 285.71 | 4 |" in text
    assert "K ≥ gallery size (7 videos)" in text
    assert "validation has 4 queries over 9 videos" in text
    worst = text.split("## Worst-ranked queries")[1].split("##")[0]
    assert "| 9 | caption 2 \\| with a pipe | v2 | v3, v4, v5 |" in worst
    assert "| 7 | caption 3" in worst and "| 3 |" not in worst
    assert "video `broken`: no features under visual fingerprint x" in text
    assert "| model.visual_dim | 1280 |" in text and "| model.gmm_widths | [null, 0.5, 1.0, 5.0] |" in text


def test_report_states_distractors_and_ties(tmp_path):
    base = summarize(
        np.array([2, 5]), np.array([1, 5]), split="test", n_videos=30, n_positives=[1, 1], n_distractors=24
    )
    metrics = RunMetrics(**base.model_dump(), training=_metrics([1], 9).training)
    write_report(RunDir(tmp_path), load_preset("demo"), metrics, [], _per_query([2, 5]), title="t")
    text = (tmp_path / "report.md").read_text()
    assert "the split's 6 videos plus 24 distractor videos" in text
    assert (
        "| model if every tie were won | 50.00 |" in text
        and "1 of 2 queries have their correct video tied" in text
    )


def test_report_without_history_has_only_rank_plot(tmp_path):
    write_report(
        RunDir(tmp_path),
        load_preset("demo"),
        _metrics([150, 200], 300),
        [],
        _per_query([150, 200]),
        title="x",
    )
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["ranks.png"]
    assert "Skipped items (0)" in (tmp_path / "report.md").read_text()
