"""`mamfusion evaluate`: R@1/5/10/100 and SumR of a trained run on a split or on a caption file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from storage.annotations import AnnotationError, AnnotationSet, read_annotations
from storage.feature_store import FeatureStoreError
from tasks.data import DataError
from tasks.evaluate import evaluate_saved_run, write_per_query
from tasks.metrics import format_metrics
from tasks.train import FEATURES_FILE

HELP = "evaluate a trained run (R@1/5/10/100, SumR) on a split of its annotations or on a caption file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run directory written by `mamfusion train`")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--split", default="test", help="split of the run's annotations (default test)")
    which.add_argument(
        "--captions", help="annotation/caption file to evaluate on (e.g. an MS-SL test captions)"
    )
    parser.add_argument("--store", help="feature store (default: the one the run was trained from)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def _annotations(run: dict[str, Any], split: str) -> AnnotationSet:
    """The run's annotations restricted to `split`; 'val' may come from the separate validation file."""
    if split == "val" and run.get("val_annotations"):
        return read_annotations(run["val_annotations"], skip_malformed=True)
    ann = read_annotations(run["annotations"], skip_malformed=True)
    if split not in {q.split for q in ann.queries}:
        raise DataError(f"{run['annotations']} has no split {split!r}; use --captions FILE")
    return ann.split(split)


def evaluate_run(
    model_dir: str | Path,
    *,
    split: str = "test",
    captions: str | Path | None = None,
    store_url: str | None = None,
) -> dict[str, Any]:
    """Evaluate the run's best model; writes eval/<name>/{metrics.json, per_query.jsonl}."""
    out = Path(model_dir)
    run = json.loads((out / FEATURES_FILE).read_text())
    ann = read_annotations(captions, skip_malformed=True) if captions else _annotations(run, split)
    name = Path(captions).stem if captions else split
    result, data = evaluate_saved_run(out, ann, name=name, store_url=store_url)
    metrics = {"split": name, **result.metrics, "skipped": len(data.skipped) + len(ann.skipped)}
    write_per_query(out / "eval" / name / "per_query.jsonl", result.per_query)
    (out / "eval" / name / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run(args: argparse.Namespace) -> int:
    try:
        metrics = evaluate_run(args.model, split=args.split, captions=args.captions, store_url=args.store)
    except (DataError, AnnotationError, FeatureStoreError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics))
    else:
        n = f"{metrics['n_queries']} queries, {metrics['n_videos']} videos"
        print(f"{metrics['split']} ({n}): {format_metrics(metrics)}")
    return 0
