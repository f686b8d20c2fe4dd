"""`mamfusion import-mssl ROOT`: load the MS-SL benchmark bundle's features into a feature store."""

from __future__ import annotations

import argparse
import json
import sys

from storage.feature_store import FeatureStore, FeatureStoreError
from storage.mssl import COLLECTIONS, MsslFormatError, MsslImport, import_mssl

HELP = (
    "import MS-SL bundle features (BigFile + RoBERTa hdf5) into a feature store, reporting what was skipped"
)
_SHOWN = 10  # skipped items listed in the text output (--json lists all)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root", metavar="ROOT", help="bundle root holding <collection>/FeatureData and TextData"
    )
    parser.add_argument("--collection", required=True, choices=COLLECTIONS)
    parser.add_argument(
        "--feature", required=True, metavar="NAME", help="FeatureData folder, e.g. i3d_resnet"
    )
    parser.add_argument("--store", required=True, metavar="URL", help="feature store path or fsspec URL")
    parser.add_argument(
        "--storage-options",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="fsspec options, e.g. for s3://",
    )
    parser.add_argument(
        "--seconds-per-row",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds each feature row spans (the bundle has no timestamps; default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")


def run(args: argparse.Namespace) -> int:
    try:
        store = FeatureStore(args.store, storage_options=args.storage_options)
        report = import_mssl(
            args.root, args.collection, args.feature, store, seconds_per_row=args.seconds_per_row
        )
    except (OSError, ValueError, FeatureStoreError) as exc:  # MsslFormatError is a ValueError
        kind = "bad bundle" if isinstance(exc, MsslFormatError) else "error"
        print(f"mamfusion import-mssl: {kind}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print_report(report)
    return 0


def print_report(report: MsslImport) -> None:
    print(f"store {report.store}")
    print(
        f"videos: {report.videos_imported} imported, {report.videos_already_present} already present, "
        f"{len(report.videos_skipped)} skipped  -> fingerprint {report.visual_fingerprint}"
    )
    print(
        f"query texts: {report.queries_imported} imported, {report.queries_already_present} already present; "
        f"{len(report.queries_skipped)} captions without features  -> fingerprint {report.text_fingerprint}"
    )
    for split, counts in report.splits.items():
        print(f"  {split}: {counts['queries']} captions over {counts['videos']} videos")
    sections = [
        ("skipped videos", [f"{s['video_id']}: {s['reason']}" for s in report.videos_skipped]),
        (
            "captions without query features",
            [f"{s['query_id']}: {s['reason']}" for s in report.queries_skipped],
        ),
        ("captions whose video has no features", [s["query_id"] for s in report.captions_without_video]),
        ("same text, different features (first kept)", [c["query_id"] for c in report.text_conflicts]),
        (
            "malformed caption lines",
            [f"{s['path']}:{s['line']}: {s['reason']}" for s in report.caption_lines_skipped],
        ),
    ]
    for title, items in sections:
        if items:
            print(f"{title}: {len(items)}")
            for item in items[:_SHOWN]:
                print(f"  {item}")
            if len(items) > _SHOWN:
                print(f"  ... (--json lists all {len(items)})")
