"""`mamfusion catalog DIR`: list the videos in a folder, readable or not, and what changed since last time.

User errors (a missing folder, a damaged or foreign `--previous` file) reach `flows.cli` as `MamFusionError`s:
one line, exit 2.
"""

from __future__ import annotations

import argparse
import json

from storage.catalog import DEFAULT_PROBE_TIMEOUT, Catalog, ScanResult, VideoRecord, scan_videos
from storage.errors import MamFusionError

HELP = "scan a video folder: ids, hashes, duration/fps/size, unreadable files with reasons, changes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="folder to scan (recursively)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--previous", metavar="CATALOG.json", help="earlier catalog: report new/changed/removed"
    )
    parser.add_argument("--save", metavar="CATALOG.json", help="write the new catalog here (atomically)")
    parser.add_argument(
        "--rehash", action="store_true", help="re-hash and re-probe files even if size/mtime match"
    )
    parser.add_argument(
        "--probe-timeout",
        type=_positive_seconds,
        default=DEFAULT_PROBE_TIMEOUT,
        metavar="S",
        help=f"seconds before a hung decoder makes a file unreadable (default {DEFAULT_PROBE_TIMEOUT:g})",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        previous = Catalog.load(args.previous) if args.previous else None
    except OSError as exc:
        raise MamFusionError(f"cannot read {args.previous}: {exc.strerror or exc}") from exc
    result = scan_videos(args.directory, previous, rehash=args.rehash, probe_timeout=args.probe_timeout)
    if args.save:
        try:
            result.catalog.save(args.save)
        except OSError as exc:
            raise MamFusionError(f"cannot write {args.save}: {exc.strerror or exc}") from exc
    if args.json:
        print(json.dumps(scan_summary(result, with_changes=previous is not None)))
    else:
        print_scan(result, with_changes=previous is not None)
    return 0


def scan_summary(result: ScanResult, *, with_changes: bool) -> dict[str, object]:
    """The --json object: every video with its fields, counts, and the changes against a previous catalog."""
    catalog = result.catalog
    summary: dict[str, object] = {
        "root": catalog.root,
        "videos": [v.to_dict() for v in catalog.videos],
        "readable": len(catalog.readable()),
        "unreadable": len(catalog.unreadable()),
        "walk_errors": result.walk_errors,
    }
    if with_changes:
        summary.update(
            new=result.new, changed=result.changed, removed=result.removed, unchanged=result.unchanged
        )
    return summary


def _describe(video: VideoRecord) -> str:
    if not video.readable:
        return f"UNREADABLE: {video.error}"
    return (
        f"{video.width}x{video.height}  {video.fps:.2f} fps  {video.n_frames} frames  "
        f"{video.duration:.2f} s  {video.size:,} bytes  sha256 {(video.sha256 or '')[:12]}"
    )


def print_scan(result: ScanResult, *, with_changes: bool) -> None:
    catalog = result.catalog
    width = max((len(v.video_id) for v in catalog.videos), default=0)
    for video in catalog.videos:
        print(f"{video.video_id:<{width}}  {_describe(video)}")
    print(
        f"{len(catalog)} videos under {catalog.root}: "
        f"{len(catalog.readable())} readable, {len(catalog.unreadable())} unreadable"
    )
    for err in result.walk_errors:
        print(f"could not list folder {err}")
    if with_changes:
        for name in ("new", "changed", "removed"):
            ids = getattr(result, name)
            print(f"{name}: {len(ids)}" + (f" ({', '.join(ids)})" if ids else ""))
        print(f"unchanged: {len(result.unchanged)}")
