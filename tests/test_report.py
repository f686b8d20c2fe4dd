"""The run report: metrics.json, per-query JSONL, PNG plots linked from report.md, worst queries listed."""

from __future__ import annotations

import json
import re

from models.config import load_preset
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


def test_write_report_is_self_contained(tmp_path):
    cfg = load_preset("demo")
    metrics = {
        "split": "test",
        "r1": 20.0,
        "r5": 40.0,
        "r10": 60.0,
        "r100": 100.0,
        "sumr": 220.0,
        "medr": 4.0,
    }
    metrics |= {"n_queries": 5, "n_videos": 7, "best_epoch": 4}
    per_query = _per_query([3, 1, 9, 7, 2])
    skipped = [{"kind": "video", "id": "broken", "reason": "no features under visual fingerprint x"}]
    report = write_report(tmp_path, cfg, metrics, _history(5), per_query, skipped, n_worst=2)

    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    lines = (tmp_path / "eval" / "per_query.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == per_query
    text = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(images) == ["plots/ranks.png", "plots/train_loss.png", "plots/val_recall.png"]
    for rel in images:
        data = (tmp_path / rel).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, rel
    assert "| 20.00 | 40.00 | 60.00 | 100.00 | 220.00 | 4 |" in text
    worst = text.split("## Worst-ranked queries")[1].split("##")[0]
    assert "| 9 | caption 2 \\| with a pipe | v2 | v3, v4, v5 |" in worst
    assert "| 7 | caption 3" in worst and "| 3 |" not in worst
    assert "video `broken`: no features under visual fingerprint x" in text
    assert "| model.visual_dim | 1280 |" in text and "| model.gmm_widths | [null, 0.5, 1.0, 5.0] |" in text


def test_report_without_history_has_only_rank_plot(tmp_path):
    metrics = {"split": "x", "r1": 0.0, "r5": 0.0, "r10": 0.0, "r100": 0.0, "sumr": 0.0, "medr": 200.0}
    write_report(tmp_path, load_preset("demo"), metrics, [], _per_query([150, 200]))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["ranks.png"]
    assert "Skipped items (0)" in (tmp_path / "report.md").read_text()
