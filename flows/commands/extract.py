"""`mamfusion extract`: visual features for a folder of videos (and token features for its captions) → store.

The same functions the Prefect flow maps, run one after another without Prefect. Unreadable videos are listed
as skipped with their reason; they do not fail the command. Videos sampled at their own, lower, frame rate
are listed under `notes`. User errors (bad --weights, missing files, a damaged store) reach `flows.cli` as
`MamFusionError`s: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from models.backbones import BACKBONES
from storage.annotations import FORMATS, read_annotations
from storage.catalog import scan_videos
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore
from tasks.extract import ExtractSummary, QuerySummary, extract_queries, extract_videos
from tasks.profiles import PROFILE_NAMES, FeatureProfile, feature_profile, text_fingerprint

HELP = "extract visual features for a video folder (and text features for an annotation file) into a store"


class ExtractArgumentError(MamFusionError, ValueError):
    """A command-line value that names something the profile does not have."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--videos", required=True, metavar="DIR", help="folder of videos (scanned recursively)"
    )
    parser.add_argument("--annotations", metavar="FILE", help="captions to encode as query features")
    parser.add_argument("--format", choices=FORMATS, help="annotation format (detected when omitted)")
    parser.add_argument(
        "--profile", choices=PROFILE_NAMES, default="lite", help="feature profile (default lite)"
    )
    parser.add_argument("--store", required=True, metavar="URL", help="feature store path or fsspec URL")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too (AMP is on by default there)")
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"local weights: NAME is a visual backbone ({', '.join(BACKBONES)}) or 'text' (a model dir)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")


def build_profile(args: argparse.Namespace) -> FeatureProfile:
    """The chosen profile with the command line's device, AMP and weights overrides."""
    base = feature_profile(args.profile)
    weights = dict(_pair(item) for item in args.weights)
    unknown = set(weights) - {"text"} - {b.name for b in base.visual.backbones}
    if unknown:
        raise ExtractArgumentError(f"--weights names {sorted(unknown)} are not in the {args.profile} profile")
    backbones = [{**b.model_dump(), "weights": weights.get(b.name, b.weights)} for b in base.visual.backbones]
    return feature_profile(
        args.profile,
        visual={"backbones": backbones, "device": args.device, "amp": not args.no_amp},
        text={"device": args.device, "weights": weights.get("text", base.text.weights)},
    )


def _pair(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ExtractArgumentError(f"--weights expects NAME=PATH, got {item!r}")
    return name, path


def run(args: argparse.Namespace) -> int:
    try:
        profile = build_profile(args)
        annotations = (
            read_annotations(args.annotations, args.format, skip_malformed=True) if args.annotations else None
        )
        if annotations:
            text_fingerprint(profile.text)  # resolves the text weights: fail before hours of video work
        records = scan_videos(args.videos).catalog.videos
        store = FeatureStore(args.store)
        videos = extract_videos(records, profile, store, progress=True)
        queries = (
            extract_queries([q.text for q in annotations.queries], profile, store) if annotations else None
        )
    except OSError as exc:
        if isinstance(exc, MamFusionError):  # WeightsNotFoundError is a FileNotFoundError too
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        raise MamFusionError(f"{where}{exc.strerror or exc}") from exc
    summary = _summary(profile, store, videos, queries, annotations)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _summary(
    profile: FeatureProfile,
    store: FeatureStore,
    videos: ExtractSummary,
    queries: QuerySummary | None,
    annotations: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "profile": profile.name,
        "store": store.url,
        "visual_fingerprint": videos.fingerprint,
        "extracted": videos.extracted,
        "cached": videos.cached,
        "skipped": videos.skipped,
        "notes": videos.notes,
        "frames_decoded": videos.stats.frames_decoded,
    }
    if queries is not None:
        lines = [{"path": f"{s.path}:{s.line}", "reason": s.reason} for s in annotations.skipped]
        out["queries"] = {
            "text_fingerprint": queries.fingerprint,
            "encoded": queries.encoded,
            "cached": queries.cached,
            "skipped": queries.skipped,
            "skipped_lines": lines,
        }
    return out


def _print_summary(summary: dict[str, Any]) -> None:
    print(
        f"videos ({summary['visual_fingerprint']}): {len(summary['extracted'])} extracted, "
        f"{len(summary['cached'])} cached, {len(summary['skipped'])} skipped"
    )
    for item in summary["skipped"]:
        print(f"  skipped {item['path']}: {item['reason']}")
    for item in summary["notes"]:
        print(f"  note {item['path']}: {item['note']}")
    queries = summary.get("queries")
    if queries:
        print(
            f"queries ({queries['text_fingerprint']}): {queries['encoded']} encoded, "
            f"{queries['cached']} cached, "
            f"{len(queries['skipped']) + len(queries['skipped_lines'])} skipped"
        )
        for item in queries["skipped_lines"]:
            print(f"  skipped {item['path']}: {item['reason']}")
        for item in queries["skipped"]:
            print(f"  skipped text {item['text']!r}: {item['reason']}")
    print(f"store: {summary['store']}")
