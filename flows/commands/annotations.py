"""`mamfusion annotations FILE`: read an annotation file in any supported format and report what it holds.

User errors (a malformed line, an unreadable file) reach `flows.cli` as `MamFusionError`s: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from storage.annotations import FORMATS, AnnotationError, AnnotationSet, read_annotations
from storage.errors import MamFusionError

HELP = (
    "read an annotation file (ActivityNet, Charades-STA, TVR, MS-SL, CSV/JSONL): queries, videos, bad lines"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="annotation file")
    parser.add_argument("--format", choices=FORMATS, help="format name (default: detected from the content)")
    parser.add_argument(
        "--skip-malformed", action="store_true", help="list malformed lines as skipped instead of failing"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="treat an invalid moment (start > end, negative, past the video) as a malformed line; by "
        "default the caption is kept without it",
    )
    parser.add_argument("--split", metavar="NAME", help="split name for queries whose file gives none")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    try:
        annotations = read_annotations(
            args.file, args.format, skip_malformed=args.skip_malformed, split=args.split, strict=args.strict
        )
    except OSError as exc:
        raise MamFusionError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    except AnnotationError as exc:
        if not exc.skippable:
            raise
        hint = f"{exc.reason} (use --skip-malformed to skip such lines)"
        raise AnnotationError(exc.path, exc.line, hint, skippable=True) from None
    if args.json:
        print(json.dumps(annotation_summary(args.file, annotations)))
    else:
        print_annotations(args.file, annotations)
    return 0


def _named_splits(annotations: AnnotationSet) -> dict[str, int]:
    return {name: n for name, n in annotations.splits().items() if name is not None}


def annotation_summary(path: str, annotations: AnnotationSet) -> dict[str, object]:
    """The --json object. `splits` counts queries per named split; queries without a split are not listed.

    `moment_issues`: accepted queries whose moment was dropped or clipped (each reason says which).
    """
    return {
        "path": path,
        "format": annotations.format,
        "queries": len(annotations.queries),
        "videos": len(annotations.video_ids()),
        "splits": _named_splits(annotations),
        "skipped": [asdict(s) for s in annotations.skipped],
        "moment_issues": [asdict(s) for s in annotations.moment_issues],
    }


def print_annotations(path: str, annotations: AnnotationSet) -> None:
    print(
        f"{path}: {annotations.format}, {len(annotations.queries)} queries over "
        f"{len(annotations.video_ids())} videos"
    )
    splits = _named_splits(annotations)
    if splits:
        print("splits: " + ", ".join(f"{name} {n}" for name, n in splits.items()))
    if annotations.moment_issues:
        print(f"kept {len(annotations.moment_issues)} caption(s) whose moment was invalid:")
        for s in annotations.moment_issues:
            print(f"  {s.path}:{s.line}: {s.reason}")
    if annotations.skipped:
        print(f"skipped {len(annotations.skipped)} malformed line(s):")
        for s in annotations.skipped:
            print(f"  {s.path}:{s.line}: {s.reason}")
