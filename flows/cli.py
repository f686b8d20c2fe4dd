"""The `mamfusion` command line.

Each subcommand lives in its own module under `flows/commands/` and exposes `HELP`,
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their command runs,
so `mamfusion catalog` does not pay for importing torch or Prefect.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from flows.logs import VERBOSE_ENV, quiet
from storage.errors import MamFusionError, clean_reason

USER_ERROR = 2  # exit code of every command for bad input, missing files, damaged stores, invalid config

# command name -> module under flows.commands
COMMANDS: dict[str, str] = {
    "catalog": "catalog",
    "annotations": "annotations",
    "demo-corpus": "demo_corpus",
    "import-mssl": "import_mssl",
    "extract": "extract",
    "train": "train",
    "evaluate": "evaluate",
    "index": "index",
    "search": "search",
    "serve": "serve",
    "pipeline": "pipeline",
    "server": "server",
    "store": "store",
}


def _available() -> dict[str, str]:
    """Commands whose module exists (later issues add modules; the table above is the whole plan)."""
    found = {}
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(f"flows.commands.{module}") is not None:
            found[name] = module
    return found


def build_parser(commands: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamfusion", description="Partially Relevant Video Retrieval with MamFusion"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in commands.items():
        mod = importlib.import_module(f"flows.commands.{module}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # argv bytes that are not UTF-8 must not crash a message
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    commands = _available()
    # Import only the chosen command's module when we can tell which one it is.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in commands:
        commands = {chosen: commands[chosen]}
    args = build_parser(commands).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet(args.verbose)
    try:
        return int(args._module.run(args) or 0)
    except MamFusionError as exc:  # a user error: one line, no traceback (bugs keep theirs)
        print(f"{args.command}: {clean_reason(str(exc))}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
