"""First vs second run of the `mamfusion` flow, and adding videos to a folder: what caching saves.

    .venv/bin/python benchmarks/bench_pipeline_cache.py [--videos 30] [--added 3] [--epochs 3]

Starts its own Prefect server (temporary PREFECT_HOME, so no earlier cache answers), generates a demo corpus
of `--videos` videos, then times, in one process against that server:
  1. the first run (everything computed),
  2. the same run again (the store holds every video, training is Cached: no decoding, inference, training),
  3. `--added` new videos, then the retrain flow (only they are extracted; the model is retrained),
  4. the retrain flow again with nothing new (it returns after the scan).
Wall times exclude the server start. Prints a Markdown table, with the task runs each flow run created (an
unchanged folder needs no extraction task run: the store answers for every video in one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect")  # before Prefect reads its settings
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from flows.params import PipelineParams  # noqa: E402
from flows.pipeline import full_pipeline, retrain_on_new_videos  # noqa: E402
from flows.server import free_port, start_server, stop_pid  # noqa: E402
from storage.demo_corpus import generate_demo_corpus  # noqa: E402


def timed(flow, params: PipelineParams) -> tuple[float, dict, int]:
    """Wall time, the flow's result and how many task runs it created (counted after the clock stops)."""
    t0 = time.perf_counter()
    state = flow(params, return_state=True)
    seconds = time.perf_counter() - t0
    with get_client(sync_client=True) as client:
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        n_tasks = len(client.read_task_runs(flow_run_filter=runs))
    return seconds, state.result(), n_tasks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=30)
    parser.add_argument("--added", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    corpus = generate_demo_corpus(WORK / "corpus", n_videos=args.videos + args.added)
    held_back = [Path(v.path) for v in corpus.videos[args.videos :]]
    spare = WORK / "spare"
    spare.mkdir()
    for path in held_back:
        shutil.move(path, spare / path.name)
    params = PipelineParams(
        videos=corpus.videos_dir,
        annotations=corpus.annotations_path,
        store=str(WORK / "features.zarr"),
        output=str(WORK / "out"),
        overrides={"n_epoch": args.epochs},
    )
    pid, url = start_server(WORK / "prefect", free_port(None))
    rows = []
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            first, r1, n1 = timed(full_pipeline, params)
            rows.append(("1. first run", first, r1, n1))
            rows.append(("2. same run again", *timed(full_pipeline, params)))
            for path in held_back:
                shutil.move(spare / path.name, path)
            rows.append((f"3. +{args.added} videos, retrain flow", *timed(retrain_on_new_videos, params)))
            rows.append(("4. retrain flow, nothing new", *timed(retrain_on_new_videos, params)))
    finally:
        stop_pid(pid)
    print(f"\n{args.videos} demo videos (+{args.added}), lite profile, demo preset, n_epoch={args.epochs}\n")
    print("| run | wall s | task runs | videos extracted | videos cached | ÷ first run | vs first run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seconds, result, n_tasks in rows:
        extracted, cached = len(result.get("extracted", [])), len(result.get("cached", []))
        print(
            f"| {name} | {seconds:.2f} | {n_tasks} | {extracted} | {cached} | {seconds / first:.3f} "
            f"| {first / seconds:.1f}x faster |"
        )
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
