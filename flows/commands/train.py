"""`mamfusion train`: features in the store + annotations -> a trained, evaluated, reported run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.config import load_preset, parse_overrides, preset_names
from storage.annotations import FORMATS
from tasks.metrics import format_metrics
from tasks.train import TrainRequest, train_run

HELP = "train MamFusion on features in the store, evaluate the selected epoch and write a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help=f"recipe: {', '.join(preset_names())}")
    parser.add_argument("--store", required=True, help="feature store path or URL (opened read-only)")
    parser.add_argument("--annotations", required=True, help="annotation file (with train/val[/test] splits)")
    parser.add_argument(
        "--val-annotations", help="validation captions when --annotations holds no 'val' split"
    )
    parser.add_argument("--format", choices=FORMATS, help="annotation format (detected when omitted)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)"
    )
    parser.add_argument(
        "--visual-fingerprint", help="visual extractor to use (needed if the store has several)"
    )
    parser.add_argument("--text-fingerprint", help="text extractor to use (needed if the store has several)")
    parser.add_argument(
        "--out", required=True, help="run directory (an existing one resumes; a changed config is refused)"
    )
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints/last.pt and start over")
    parser.add_argument("--json", action="store_true", help="print the test metrics as one JSON object")


def run(args: argparse.Namespace) -> int:
    request = TrainRequest(
        config=load_preset(args.preset, parse_overrides(args.set)),
        store=args.store,
        annotations=args.annotations,
        run_dir=args.out,
        val_annotations=args.val_annotations,
        annotation_format=args.format,
        visual_fingerprint=args.visual_fingerprint,
        text_fingerprint=args.text_fingerprint,
        resume=not args.no_resume,
    )
    metrics = train_run(request, progress=sys.stderr.isatty())
    if args.json:
        print(metrics.model_dump_json())
        return 0
    print(format_metrics(metrics))
    print(f"selected epoch {metrics.training.best_epoch} of {metrics.training.epochs_run}")
    for warning in metrics.training.warnings:
        print(f"warning: {warning}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
