"""`mamfusion server up|down|status`: a local Prefect server + worker with the MamFusion deployments."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from flows.server import LocalPrefect, LocalServerError, healthy, stop_started, up

HELP = "start (up) or stop (down) a local Prefect server, work pool, deployments and worker"
DEFAULT_HOME = "demo_out/prefect"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument(
        "--home", default=DEFAULT_HOME, help=f"Prefect home of our server (default {DEFAULT_HOME})"
    )
    parser.add_argument(
        "--port", type=int, help="start a new server on this port (default: reuse one, else 4200)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    """1 when a step failed or `down` refused to signal a process it could not verify as ours."""
    refused: list[str] = []
    try:
        if args.action == "up":
            local = up(args.home, args.port)
            state = {"api_url": local.api_url, "started": local.started, "home": local.home}
        elif args.action == "down":
            report = stop_started(args.home)
            refused = report.refused
            state = {"stopped": report.stopped, "refused": refused}
        else:
            local = LocalPrefect.load(args.home)
            state = (
                {"running": False} if local is None else {**asdict(local), "healthy": healthy(local.api_url)}
            )
    except LocalServerError as exc:
        print(f"server: {exc}", file=sys.stderr)
        return 1
    for message in refused:  # on stderr in --json mode too: stdout stays one JSON object
        print(f"server down: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(state))
    elif args.action == "up":
        print(f"Prefect API {state['api_url']}; started {', '.join(state['started']) or 'nothing (reused)'}")
        print(f"export PREFECT_API_URL={state['api_url']}")
        print("prefect deployment run mamfusion/demo   # the bundled demo corpus")
        print(
            "prefect deployment run mamfusion/full-pipeline "
            """--param params='{"videos": "DIR", "annotations": "FILE"}'"""
        )
        print(f"stop with: mamfusion server down --home {args.home}")
    elif args.action == "down":
        print(f"stopped: {', '.join(state['stopped']) or 'nothing'}")
    else:
        print(json.dumps(state, indent=2))
    return 1 if refused else 0
