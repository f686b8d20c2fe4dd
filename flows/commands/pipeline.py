"""`mamfusion pipeline`: run the `mamfusion` flow in this process (no deployment or worker needed).

Uses the Prefect API in PREFECT_API_URL, else a temporary local server. `--retrain` runs the
retrain-on-new-videos flow (exits at once when nothing changed); `--dask` fans extraction out over Dask.
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from flows.params import DEFAULT_OUTPUT, DEFAULT_STORE, DEFAULT_VIDEOS, PipelineParams
from models.config import ConfigError, parse_overrides
from storage.registry import RunMetrics
from tasks.metrics import format_metrics

HELP = "run the whole pipeline (scan, extract, train, evaluate, publish, index) as a Prefect flow"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", help="video folder (scanned recursively)")
    parser.add_argument("--annotations", help="captions with train/val[/test] splits")
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"the bundled demo corpus ({DEFAULT_VIDEOS}, generated if missing)",
    )
    parser.add_argument("--format", help="annotation format (detected when omitted)")
    parser.add_argument("--val-annotations", help="validation captions if the file has no val split")
    parser.add_argument("--profile", default="lite", help="feature profile: lite or paper")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--preset", default="demo", help="training preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--store", default=DEFAULT_STORE, help="feature store path or URL")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="catalog, runs, models")
    parser.add_argument("--concurrency", type=int, default=2, help="videos extracted at once")
    parser.add_argument("--retrain", action="store_true", help="only if videos or captions changed")
    parser.add_argument(
        "--dask",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="Dask scheduler (default: a local cluster)",
    )
    parser.add_argument("--json", action="store_true", help="print the flow's result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from flows.pipeline import dask_task_runner, full_pipeline, retrain_on_new_videos

    try:
        params = PipelineParams(
            demo=args.demo,
            videos=args.videos,
            annotations=args.annotations,
            annotation_format=args.format,
            val_annotations=args.val_annotations,
            profile=args.profile,
            device=args.device,
            preset=args.preset,
            overrides=parse_overrides(args.set),
            store=args.store,
            output=args.output,
            extract_concurrency=args.concurrency,
        )
    except (ValidationError, ConfigError) as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 2
    flow = retrain_on_new_videos if args.retrain else full_pipeline
    if args.dask:
        flow = flow.with_options(task_runner=dask_task_runner(None if args.dask == "local" else args.dask))
    state = flow(params, return_state=True)
    if not state.is_completed():
        print(f"pipeline: flow run {state.name}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    if args.json:
        print(json.dumps(result))
    elif result["status"] == "nothing-new":
        print(f"nothing new; current model {result['current']}")
    else:
        print(format_metrics(RunMetrics.model_validate(result["metrics"])))
        if result["version"] is None:
            print(f"no new version: {result['reason']}; current model {result['current']}")
        else:
            state_word = "current" if result["promoted"] else "candidate"
            print(f"{result['version']} ({state_word}): {result['reason']}")
        print(f"report: {result['report']}")
    return 0
