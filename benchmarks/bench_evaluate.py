"""Evaluation throughput: query-video pairs ranked per second, batched vs per-query loops.

Rows: `tasks.evaluate.rank_queries` (query chunks x gallery chunks, ranks by tensor ops), a per-query loop
that scores one query against the whole gallery and ranks it (the official evaluator's shape), and a naive
loop over (query, video) pairs. Random 384-d embeddings with 32 clips (the scoring cost does not depend on
the weights). One thread for every row, so the ratios compare like with like.

    .venv/bin/python benchmarks/bench_evaluate.py [--galleries 1000 10000] [--queries 500]
"""

from __future__ import annotations

import argparse
import time

import torch

from models.config import load_preset
from models.mamfusion import MamFusion, VideoEmbedding
from tasks.evaluate import rank_queries


def _gallery(n: int, d: int, n_clips: int, gen: torch.Generator) -> VideoEmbedding:
    return VideoEmbedding(torch.randn(n, n_clips, d, generator=gen), torch.randn(n, d, generator=gen))


def per_query_loop(
    model: MamFusion, queries: torch.Tensor, gallery: VideoEmbedding, targets: list[int]
) -> list[int]:
    """One query at a time against the whole gallery, rank by sorting (as the official evaluator does)."""
    ranks = []
    for i, t in enumerate(targets):
        order = model.score(queries[i : i + 1], gallery)[0].argsort(descending=True)
        ranks.append(int((order == t).nonzero()[0]) + 1)
    return ranks


def pair_loop(
    model: MamFusion, queries: torch.Tensor, gallery: VideoEmbedding, targets: list[int]
) -> list[int]:
    """The naive baseline: a Python loop over (query, video) pairs."""
    ranks = []
    for i, t in enumerate(targets):
        q = queries[i : i + 1]
        scores = [
            float(model.score(q, VideoEmbedding(gallery.clips[j : j + 1], gallery.video[j : j + 1])))
            for j in range(len(gallery))
        ]
        ranks.append(1 + sum(s >= scores[t] for j, s in enumerate(scores) if j != t))
    return ranks


def _time(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galleries", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--queries", type=int, default=500, help="queries for the batched path")
    parser.add_argument("--loop-queries", type=int, default=20, help="queries for the per-query loop")
    parser.add_argument(
        "--pair-queries", type=int, default=2, help="queries for the (query, video) pair loop"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = MamFusion(load_preset("tvr").model).eval()
    d, n_clips = model.config.hidden_size, model.config.map_size
    gen = torch.Generator().manual_seed(0)
    print("| gallery | method | queries timed | pairs/s | speed-up vs pair loop |")
    print("|---:|---|---:|---:|---:|")
    with torch.inference_mode():
        for n in args.galleries:
            gallery = _gallery(n, d, n_clips, gen)
            queries = torch.randn(args.queries, d, generator=gen)
            targets = torch.randint(0, n, (args.queries,), generator=gen).tolist()
            rows = []
            t, batched = _time(rank_queries, model, queries, gallery, [[t] for t in targets])
            rows.append(("batched `rank_queries`", args.queries, t))
            m = args.loop_queries
            t, looped = _time(per_query_loop, model, queries[:m], gallery, targets[:m])
            rows.append(("per-query loop + argsort", m, t))
            p = args.pair_queries
            t, paired = _time(pair_loop, model, queries[:p], gallery, targets[:p])
            rows.append(("(query, video) pair loop", p, t))
            assert (
                batched.ranks[:m].tolist() == looped and batched.ranks[:p].tolist() == paired
            )  # same answer
            base = p * n / rows[-1][2]
            for name, nq, secs in rows:
                rate = nq * n / secs
                print(f"| {n:,} | {name} | {nq} | {rate:,.0f} | {rate / base:,.0f}x |")


if __name__ == "__main__":
    main()
