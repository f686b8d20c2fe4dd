"""`mamfusion demo-corpus OUT`: write the seeded synthetic demo videos and their captions."""

from __future__ import annotations

import argparse
import json

from storage.demo_corpus import generate_demo_corpus
from storage.errors import MamFusionError

HELP = "generate the seeded demo corpus: short synthetic videos + captioned events (annotations.csv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (new, empty, or an earlier demo corpus to regenerate)")
    parser.add_argument("--videos", type=int, default=48, help="number of videos (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    try:  # DemoCorpusError (folder in use, invalid size) goes to flows.cli: one line, exit 2
        corpus = generate_demo_corpus(args.out, n_videos=args.videos, seed=args.seed)
    except OSError as exc:
        raise MamFusionError(f"cannot write the demo corpus to {args.out}: {exc.strerror or exc}") from exc
    summary = {
        "out_dir": corpus.out_dir,
        "videos_dir": corpus.videos_dir,
        "annotations": corpus.annotations_path,
        "manifest": corpus.manifest_path,
        "videos": len(corpus.videos),
        "queries": corpus.n_queries,
        "splits": corpus.split_counts(),
        "seconds": round(sum(v.duration for v in corpus.videos), 3),
        "seed": corpus.config.seed,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
        print(f"wrote {summary['videos']} videos ({splits}), {summary['seconds']:.0f} s of video")
        print(f"{summary['queries']} captions: {corpus.annotations_path}")
    return 0
