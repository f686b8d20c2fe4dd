"""`mamfusion annotations FILE`: read an annotation file in any supported format and report what it holds."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from storage.annotations import FORMATS, AnnotationError, AnnotationSet, read_annotations

HELP = (
    "read an annotation file (ActivityNet, Charades-STA, TVR, MS-SL, CSV/JSONL): queries, videos, bad lines"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="annotation file")
    parser.add_argument("--format", choices=FORMATS, help="format name (default: detected from the content)")
    parser.add_argument(
        "--skip-malformed", action="store_true", help="list malformed lines as skipped instead of failing"
    )
    parser.add_argument("--split", metavar="NAME", help="split name for queries whose file gives none")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    try:
        annotations = read_annotations(
            args.file, args.format, skip_malformed=args.skip_malformed, split=args.split
        )
    except OSError as exc:
        print(
            f"mamfusion annotations: error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    except AnnotationError as exc:
        print(
            f"mamfusion annotations: error: {exc} (use --skip-malformed to skip such lines)", file=sys.stderr
        )
        return 1
    if args.json:
        print(json.dumps(annotation_summary(args.file, annotations)))
    else:
        print_annotations(args.file, annotations)
    return 0


def _named_splits(annotations: AnnotationSet) -> dict[str, int]:
    return {name: n for name, n in annotations.splits().items() if name is not None}


def annotation_summary(path: str, annotations: AnnotationSet) -> dict[str, object]:
    """The --json object. `splits` counts queries per named split; queries without a split are not listed."""
    return {
        "path": path,
        "format": annotations.format,
        "queries": len(annotations.queries),
        "videos": len(annotations.video_ids()),
        "splits": _named_splits(annotations),
        "skipped": [asdict(s) for s in annotations.skipped],
    }


def print_annotations(path: str, annotations: AnnotationSet) -> None:
    print(
        f"{path}: {annotations.format}, {len(annotations.queries)} queries over "
        f"{len(annotations.video_ids())} videos"
    )
    splits = _named_splits(annotations)
    if splits:
        print("splits: " + ", ".join(f"{name} {n}" for name, n in splits.items()))
    if annotations.skipped:
        print(f"skipped {len(annotations.skipped)} malformed line(s):")
        for s in annotations.skipped:
            print(f"  {s.path}:{s.line}: {s.reason}")
