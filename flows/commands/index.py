"""`mamfusion index`: encode a gallery once with a trained model into its search index, or update it."""

from __future__ import annotations

import argparse
import json

from storage.annotations import read_annotations
from storage.catalog import Catalog
from storage.registry import resolve_model_dir
from tasks.search import build_index, default_index_url

HELP = "build or update the search index of a trained model (only new videos are encoded)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="version or run folder, a models folder or a pipeline output folder (then its current model)",
    )
    parser.add_argument("--store", help="feature store path or URL (default: the one in features.json)")
    gallery = parser.add_mutually_exclusive_group(required=True)
    gallery.add_argument("--catalog", help="catalog JSON: index its readable videos, with their paths")
    gallery.add_argument("--annotations", help="annotation file: index the videos it names")
    parser.add_argument("--split", help="with --annotations: only this split's videos")
    parser.add_argument("--out", help="index path or URL (default: <model>/index.zarr)")
    parser.add_argument("--fp32", action="store_true", help="store float32 vectors (default float16)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    model = resolve_model_dir(args.model)
    if args.catalog:
        gallery = {"catalog": Catalog.load(args.catalog)}
    else:
        ann = read_annotations(args.annotations, skip_malformed=True)
        gallery = {"video_ids": (ann.split(args.split) if args.split else ann).video_ids()}
    summary = build_index(
        model,
        args.store,
        args.out or default_index_url(model),
        dtype="float32" if args.fp32 else "float16",
        **gallery,
    )
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    rebuilt = f" (rebuilt: {summary.rebuilt})" if summary.rebuilt else ""
    print(
        f"{summary.index_url}: {len(summary.added)} added, {len(summary.removed)} removed, "
        f"{summary.kept} kept, {len(summary.skipped)} skipped{rebuilt}"
    )
    for item in summary.skipped:
        print(f"  skipped {item.id}: {item.reason}")
    return 0
