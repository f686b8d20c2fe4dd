"""`mamfusion search`: ranked videos and the matching moment for text queries, from a model's search index."""

from __future__ import annotations

import argparse
import dataclasses
import json

from storage.registry import resolve_model_dir
from tasks.search import ApproxConfig, Hit, Searcher, default_index_url

HELP = "search the index of a trained model with text queries (video, score and matching moment)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="+", help="query text (several queries are scored together)")
    parser.add_argument(
        "--model",
        required=True,
        help="version folder, a models folder or a pipeline output folder (then its current model)",
    )
    parser.add_argument("--index", help="index path or URL (default: <model>/index.zarr)")
    parser.add_argument("--top-k", type=int, default=10, help="videos per query (default 10)")
    parser.add_argument(
        "--approximate", action="store_true", help="faiss first stage + exact re-scoring (very large indexes)"
    )
    parser.add_argument(
        "--kernel",
        choices=("matmul", "fused", "auto"),
        default="auto",
        help="scoring loop: fused reads fp16 indexes near memory speed (a compiled extension built at "
        "install time); auto takes it where it is installed (default auto)",
    )
    parser.add_argument("--json", action="store_true", help="print all results as one JSON object")


def format_hits(query: str, hits: list[Hit]) -> str:
    """A fixed-width table per query for the terminal."""
    head = f"{'rank':>4}  {'score':>7}  {'moment (s)':>13}  {'best clip':>11}  video id / path"
    lines = [f"query: {query}", head]
    for h in hits:
        moment, clip = f"{h.start:.1f}-{h.end:.1f}", f"{h.clip_start:.1f}-{h.clip_end:.1f}"
        lines.append(f"{h.rank:>4}  {h.score:>7.4f}  {moment:>13}  {clip:>11}  {h.video_id}  {h.path}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    model = resolve_model_dir(args.model)
    index_url = args.index or default_index_url(model)
    searcher = Searcher.from_model_dir(
        model,
        index_url,
        kernel=args.kernel,
        approximate=ApproxConfig() if args.approximate else None,
    )
    results = searcher.search(args.query, top_k=args.top_k)
    if args.json:
        out = [
            {"query": q, "hits": [dataclasses.asdict(h) for h in hits]}
            for q, hits in zip(args.query, results, strict=True)
        ]
        print(json.dumps({"model": str(model.path), "index": index_url, "results": out}))
        return 0
    print(f"model {model.path} ({searcher.scanner.index.count} indexed videos)\n")
    print("\n\n".join(format_hits(q, hits) for q, hits in zip(args.query, results, strict=True)))
    return 0
