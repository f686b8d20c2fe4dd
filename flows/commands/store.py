"""`mamfusion store verify STORE`: check every chunk of a feature store or a search index, and repair it.

Exit codes: 0 when nothing is damaged (or `--repair` fixed all of it), 1 when damage remains (each item is
listed: entry, extractor, object, reason), 2 for user errors such as a URL that is not a store.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from storage.errors import MamFusionError
from storage.feature_store import FeatureStore, StoreVerifyReport
from storage.index import IndexVerifyReport, is_index, verify_index

HELP = (
    "check a feature store or search index for damaged chunks (verify), optionally dropping them (--repair)"
)
DAMAGED = 1  # exit code when damage was found and is still there


class StoreCommandError(MamFusionError):
    """Bad arguments to `mamfusion store`."""


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = sub.add_parser(
        "verify",
        help="read every committed entry, pack and index chunk and check its checksum",
        description="Read every committed entry, pack chunk, registration and name record of a feature store "
        "(or every chunk of a search index: given with --index or found at STORE) and check sizes and "
        "crc32c checksums. Arrays written before checksums are counted as 'no checksum' (a re-pack adds them "
        "to packs; re-extraction to entries; rebuilding an index to it).",
    )
    verify.add_argument("url", metavar="STORE", nargs="?", help="feature store (or index) path or fsspec URL")
    verify.add_argument("--index", metavar="URL", help="verify this search index instead of a feature store")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="store: drop damaged entries (commit marker and pack reference) so the next extraction "
        "re-extracts them; index: rewrite damaged chunks blank and tombstone their rows",
    )
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    verify.add_argument(
        "--storage-options", type=_json_object, default=None, metavar="JSON", help="fsspec options, e.g. s3"
    )


def run(args: argparse.Namespace) -> int:
    if args.index and args.url:
        raise StoreCommandError("give either STORE or --index URL, not both")
    target = args.index or args.url
    if not target:
        raise StoreCommandError("give the STORE to verify (or --index URL)")
    report: StoreVerifyReport | IndexVerifyReport
    if args.index or is_index(target, args.storage_options):
        report = verify_index(target, repair=args.repair, storage_options=args.storage_options)
    else:
        store = FeatureStore(target, args.storage_options, read_only=True)  # a missing store is not created
        if args.repair:
            store = FeatureStore(target, args.storage_options)
        report = store.verify(repair=args.repair)
    if args.json:
        print(json.dumps(report.to_dict()))
    elif isinstance(report, IndexVerifyReport):
        _print_index(report)
    else:
        _print_store(report)
    return 0 if report.ok else DAMAGED


def _print_store(report: StoreVerifyReport) -> None:
    status = "OK" if not report.damaged else ("REPAIRED" if report.ok else "DAMAGED")
    print(
        f"{report.url}: {status}: {report.entries} entries, {report.packs} packs, {report.extractors} "
        f"extractors, {report.names} names checked; {len(report.damaged)} damaged"
    )
    if report.entries_without_checksum or report.packs_without_checksum:
        print(
            f"  no checksum: {report.entries_without_checksum} entries, "
            f"{report.packs_without_checksum} packs "
            "(written before checksums: only their sizes were checked; `pack` rewrites packs with checksums, "
            "re-extraction rewrites entries)"
        )
    for d in report.damaged:
        where = f"{d.namespace}/" if d.namespace else ""
        name = f" ({d.video_id!r})" if d.video_id else ""
        more = f"; holds {len(d.affected)} entries" if d.affected else ""
        mark = "repaired" if d.repaired else "damaged"
        print(f"  {mark} {d.kind} {where}{d.fingerprint} {d.entry or ''}{name}: {d.key}: {d.reason}{more}")
    for action in report.actions:
        print(f"  {action}")
    if not report.ok:
        print(f"  run `mamfusion store verify {report.url} --repair` to drop them (re-extracted next run)")


def _print_index(report: IndexVerifyReport) -> None:
    status = "OK" if not report.damaged else ("REPAIRED" if report.ok else "DAMAGED")
    print(
        f"{report.url}: {status}: {report.count} rows, {report.chunks} chunks checked; "
        f"{len(report.damaged)} damaged"
    )
    if report.arrays_without_checksum:
        print(
            f"  no checksum: {', '.join(report.arrays_without_checksum)} (built before checksums: only sizes "
            "were checked; delete the index and run `mamfusion index` to rebuild it with checksums)"
        )
    for d in report.damaged:
        ids = (
            f" (videos {', '.join(d.video_ids[:5])}{', ...' if len(d.video_ids) > 5 else ''})"
            if d.video_ids
            else ""
        )
        mark = "repaired" if d.repaired else "damaged"
        print(f"  {mark} {d.array} rows {d.rows[0]}..{d.rows[1] - 1}{ids}: {d.key}: {d.reason}")
    for action in report.actions:
        print(f"  {action}")
    if report.rebuild:
        print("  the index structure is damaged: delete it and run `mamfusion index` to rebuild it")
    elif not report.ok:
        print(f"  run `mamfusion store verify --index {report.url} --repair` to tombstone those rows")
