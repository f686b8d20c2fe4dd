"""`mamfusion serve`: the search API and a search page for a model, switching to newer models as published."""

from __future__ import annotations

import argparse
import os

HELP = "serve searches over HTTP: a JSON API, video media with seeking, and a search page (default 127.0.0.1)"
TOKEN_ENV = "MAMFUSION_SERVE_TOKEN"


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="pipeline output folder or models folder (follows `current`: a newer model is picked up without "
        "a restart), or one version folder",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"secret every /api and /media request must carry (required off loopback; default ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from this origin to call the API (repeatable; default: none)",
    )
    parser.add_argument(
        "--catalog", help="catalog JSON for video metadata (default: the pipeline output's catalog.json)"
    )
    parser.add_argument(
        "--kernel", choices=("matmul", "fused", "auto"), default="auto", help="scoring loop (as search)"
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=2.0, help="how often to look for a newer model (default 2)"
    )
    parser.add_argument(
        "--max-batch", type=_positive, default=64, help="queries scored together (default 64)"
    )
    parser.add_argument(
        "--max-queue", type=_positive, default=256, help="queued queries before answering 503 (default 256)"
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        help="CPU threads for scoring (default: torch's, one per core; on a machine busy with other work, "
        "fewer avoid oversubscribed threads spinning)",
    )


def run(args: argparse.Namespace) -> int:
    # imported here: `mamfusion --help` must not pay for the web stack and torch
    from flows.serve import check_bind, create_app, run_server
    from tasks.serve import ModelSource, SearchService, default_loader

    check_bind(args.host, args.token)  # before loading anything: a refused bind costs nothing
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    source = ModelSource.from_path(args.model, args.catalog)
    service = SearchService(
        source,
        loader=default_loader(args.kernel),
        poll_s=args.poll_seconds,
        max_batch=args.max_batch,
        max_pending=args.max_queue,
    )
    service.start()  # loads the current model now: a broken one is a one-line error, exit 2
    app = create_app(service, token=args.token, cors_origins=args.cors_origin)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def started() -> None:
        served = service.live.get()
        what = (
            f"version {served.version} ({len(served.videos)} videos)"
            if served
            else f"no model yet ({service.live.problem})"
        )
        print(f"serving {what} from {source.describe()}", flush=True)
        query = f"?token={args.token}" if args.token else ""
        print(f"search page: http://{host}:{args.port}/{query}   API docs: http://{host}:{args.port}/docs")
        if args.token:
            print("every /api and /media request needs the token ('Authorization: Bearer TOKEN' or ?token=)")
        if source.registry is not None:
            print(f"a newer `current` in {source.registry.path} is served without a restart", flush=True)

    try:
        run_server(app, args.host, args.port, on_started=started)
    finally:
        service.close()
    return 0
