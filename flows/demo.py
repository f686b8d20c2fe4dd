"""`python -m flows.demo` (what `make demo` runs): the whole system on a generated corpus, through Prefect.

1. generates the demo corpus (seeded synthetic videos + captions) under OUT/corpus;
2. reuses a running Prefect server or starts one (SQLite, 127.0.0.1), registers the deployments and starts
   a worker;
3. runs `mamfusion/full-pipeline` through the deployment (lite features, demo preset);
4. prints the metrics, where the report is, and a few searches with the moment each hit matched;
5. stops what it started, unless --keep-server (then it says how to stop it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flows.server import LocalPrefect, down, run_deployment, up
from models.config import parse_overrides
from storage.annotations import read_annotations
from storage.demo_corpus import generate_demo_corpus
from storage.registry import ModelRegistry, RegistryError
from tasks.metrics import format_metrics
from tasks.search import Searcher

N_EXAMPLES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="where everything goes (default demo_out)")
    parser.add_argument("--videos", type=int, default=48, help="demo videos to generate (default 48)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override")
    parser.add_argument("--port", type=int, help="start our own server on this port")
    parser.add_argument("--keep-server", action="store_true", help="leave the server and worker running")
    return parser.parse_args(argv)


def pipeline_params(out: Path, corpus_videos: str, annotations: str, overrides: list[str]) -> dict:
    return {
        "videos": corpus_videos,
        "annotations": annotations,
        "store": str(out / "features.zarr"),
        "output": str(out / "pipeline"),
        "profile": "lite",
        "preset": "demo",
        "demo": True,
        "overrides": parse_overrides(overrides),
    }


def show_results(models_dir: Path, annotations: str) -> None:
    """Metrics and report of the current model, then searches for a few test captions."""
    model_dir = ModelRegistry(models_dir).current()
    if model_dir is None:
        raise RegistryError(f"{models_dir}: no current model after the pipeline run")
    print(f"\ncurrent model {model_dir.version}:")
    print(format_metrics(model_dir.read_metrics()))
    print(f"report: {model_dir.report_file}")
    queries = read_annotations(annotations).split("test").queries[:N_EXAMPLES]
    searcher = Searcher.from_model_dir(model_dir)
    for query, hits in zip(queries, searcher.search([q.text for q in queries], top_k=3), strict=True):
        print(f"\nsearch {query.text!r}  (truth: {query.video_id} {query.start:.1f}-{query.end:.1f} s)")
        for hit in hits:
            print(
                f"  {hit.rank}. {hit.video_id}  score {hit.score:.3f}  moment {hit.start:.1f}-{hit.end:.1f} s"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out).absolute()
    corpus = generate_demo_corpus(out / "corpus", n_videos=args.videos)
    print(f"demo corpus: {len(corpus.videos)} videos, {corpus.n_queries} captions in {corpus.out_dir}")
    local: LocalPrefect | None = None
    try:
        local = up(out / "prefect", args.port)
        print(f"Prefect API {local.api_url} (UI {local.api_url.removesuffix('/api')}), worker on local-pool")
        params = pipeline_params(out, corpus.videos_dir, corpus.annotations_path, args.set)
        run = run_deployment(local, "mamfusion/full-pipeline", params)
        if not run.completed:
            print(run.output, file=sys.stderr)
            print(
                f"flow run {run.flow_run_id} did not complete; logs: {local.home}/worker.log", file=sys.stderr
            )
            return 1
        print(f"flow run {run.flow_run_id} completed")
        show_results(out / "pipeline" / "models", corpus.annotations_path)
    finally:
        if local is not None and not args.keep_server:
            down(local.home)
    print(f"\ndemo finished in {time.monotonic() - t0:.0f} s")
    print(
        f"search the demo in a browser: mamfusion serve --model {out / 'pipeline'}   (then open http://127.0.0.1:8000/)"
    )
    if args.keep_server and local is not None:
        print(f"server and worker still running; stop them with: mamfusion server down --home {local.home}")
        print(f"to use this server from a shell: export PREFECT_API_URL={local.api_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
