"""Load test of `mamfusion serve` on loopback: /api/search throughput and latency with 1, 4 and 16 concurrent
clients, beside the in-process single-query and batch-of-100 figures measured in the same run.

The index is synthetic (random unit fp16 vectors, d=384, 32 clips + 1 pooled vector per video, written with
`storage.index` in 4096-video chunks), the model a randomly initialised MamFusion of the paper's hidden size,
and queries go through a hash text encoder (per-word random token features): the benchmark measures the
scan, the micro-batching and the HTTP path, not a text backbone. Every client keeps one HTTP connection and
sends `--queries` distinct queries one after another; latency is per request, throughput is all requests over
the wall time of the round. Results: one Markdown table on stdout (progress on stderr).

    .venv/bin/python benchmarks/bench_serve.py                          # 100k videos
    .venv/bin/python benchmarks/bench_serve.py --sizes 10000 100000 --queries 8 --work /tmp/bench-serve
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM, CLIPS, CHUNK = 384, 32, 4096
WORDS = [
    "person",
    "dog",
    "door",
    "kitchen",
    "beach",
    "light",
    "car",
    "ball",
    "child",
    "runs",
    "opens",
    "cooks",
]


class HashTextEncoder:
    """Deterministic per-word token features (no text backbone to load or time)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [
            np.stack([np.random.default_rng(list(w.encode())).standard_normal(self.dim) for w in t.split()])
            for t in texts
        ]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(root: Path, n_videos: int, seed: int = 0) -> Path:
    """A version folder with a random model and a synthetic index of `n_videos` at <folder>/index.zarr."""
    import torch

    from models.config import MamFusionConfig
    from models.mamfusion import MamFusion
    from storage.index import VideoIndex

    folder = root / f"model-{n_videos}"
    if (folder / "index.zarr").is_dir() and VideoIndex.open(str(folder / "index.zarr")).complete:
        return folder  # kept from an earlier run with --work
    torch.manual_seed(seed)
    MamFusion(MamFusionConfig(visual_dim=16, query_dim=DIM)).save_pretrained(folder)
    index = VideoIndex.create(
        str(folder / "index.zarr"), model_fingerprint="synthetic", dim=DIM, n_clips=CLIPS, dtype="float16"
    )
    rng = np.random.default_rng(seed)
    spans = np.broadcast_to(np.stack([np.arange(CLIPS), np.arange(CLIPS) + 1.0], 1), (CHUNK, CLIPS, 2))
    for start in range(0, n_videos, CHUNK):
        k = min(CHUNK, n_videos - start)
        vectors = rng.standard_normal((k, CLIPS + 1, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
        ids = [f"v{start + i:07d}" for i in range(k)]
        index.append(vectors, spans[:k], ids, ids, ids)
    index.set_complete(True)
    return folder


def queries(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) + f" {seed}-{i}" for i in range(n)]


def peak_gmacs() -> float:
    """The machine's fp32 multiply-add rate now, at torch's thread count: the best of a large matrix product,
    which no exact scan can beat (a batch of queries is compute-bound, a single query memory-bound)."""
    import torch

    a, b = torch.randn(2048, DIM), torch.randn(DIM, 4096)
    best = min(timed(lambda: [torch.mm(a, b) for _ in range(10)]) for _ in range(5))
    return 10 * a.shape[0] * DIM * b.shape[1] / best / 1e9


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Round:
    clients: int
    requests: int
    wall_s: float
    latencies: list[float]
    errors: int
    batches: int
    batched_queries: int

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def load_round(port: int, service, clients: int, per_client: int, seed: int) -> Round:
    """`clients` threads, each on its own keep-alive connection, `per_client` queries one after another."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        texts = queries(per_client, seed * 1000 + i)
        barrier.wait()
        for text in texts:
            t = time.perf_counter()
            try:
                conn.request("GET", f"/api/search?k=10&q={quote(text)}")
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and len(json.loads(body)["results"][0]["hits"]) == 10
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    batches0, queries0 = service.batcher.batches, service.batcher.queries
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return Round(
        clients,
        clients * per_client,
        wall,
        latencies,
        errors[0],
        service.batcher.batches - batches0,
        service.batcher.queries - queries0,
    )


def bench_size(
    root: Path, n_videos: int, per_client: int, client_counts: list[int], singles: int, linger_s: float
) -> list[str]:
    import torch

    from flows.serve import BackgroundServer, create_app
    from models.mamfusion import MamFusion
    from storage.index import VideoIndex
    from tasks.search import IndexScanner, Searcher
    from tasks.serve import ModelSource, SearchService

    t = time.perf_counter()
    folder = build(root, n_videos)
    log(f"{n_videos} videos: index built in {time.perf_counter() - t:.0f} s")
    index = VideoIndex.open(str(folder / "index.zarr"))
    searcher = Searcher(MamFusion.from_pretrained(folder), HashTextEncoder(DIM), IndexScanner(index))
    kernel = searcher.scanner.kernel

    searcher.search(queries(2, 99), 10)  # warm-up
    # the machine is shared: single queries are timed before and after the server rounds, and the median of
    # all of them is the reference; a batch as large as each client count is the best that count allows
    single = [timed(lambda q=q: searcher.search([q], 10)) for q in queries(singles, 7)]
    batch_s = {}
    for n in sorted({c for c in client_counts if c > 1} | {100}):
        batch = queries(n, 1000 + n)
        batch_s[n] = min(timed(lambda b=batch: searcher.search(b, 10)) for _ in range(2))
    log(f"in-process: single {statistics.median(single) * 1e3:.0f} ms, batches {batch_s}")

    service = SearchService(
        ModelSource.from_path(folder), loader=lambda model, url: searcher, linger_s=linger_s
    )
    service.start()
    rounds = []
    with BackgroundServer(create_app(service)) as server:
        load_round(server.port, service, 1, 2, seed=0)  # warm-up: connection, routes, JSON
        for c in client_counts:
            r = load_round(server.port, service, c, per_client, seed=c)
            rounds.append(r)
            log(f"{c} clients: {r.throughput:.2f} q/s, p50 {r.pct(0.5) * 1e3:.0f} ms, errors {r.errors}")
    after = [timed(lambda q=q: searcher.search([q], 10)) for q in queries(singles, 9)]
    log(f"in-process again: single {statistics.median(after) * 1e3:.0f} ms")
    single += after
    single_s = statistics.median(single)
    peak = peak_gmacs()

    gb = index.nbytes / 1e9
    rows = [
        f"| {n_videos:,} ({gb:.1f} GB) | in-process, 1 query at a time | {len(single)} | "
        f"{1 / single_s:.2f} | {single_s * 1e3:.0f} | {max(single) * 1e3:.0f} | 0 | 1 |",
    ]
    for n, seconds in batch_s.items():
        rows.append(
            f"| {n_videos:,} | in-process, batch of {n} | {n} | {n / seconds:.2f} | "
            f"{seconds * 1e3:.0f} (batch) | - | 0 | {n} |"
        )
    for r in rounds:
        mean_batch = r.batched_queries / r.batches if r.batches else float("nan")
        rows.append(
            f"| {n_videos:,} | server, {r.clients} client{'s' if r.clients > 1 else ''} | {r.requests} | "
            f"{r.throughput:.2f} | {r.pct(0.5) * 1e3:.0f} | {r.pct(0.99) * 1e3:.0f} | {r.errors} | "
            f"{mean_batch:.1f} |"
        )
    top = rounds[-1]
    ceiling = top.clients / batch_s[top.clients] if top.clients in batch_s else float("nan")
    # a closed loop of N clients waits at least one batch of N per request: its time at the peak rate
    floor_s = top.clients * n_videos * (CLIPS + 1) * DIM / (peak * 1e9)
    goals = (
        f"{n_videos:,} videos, {top.clients} clients: throughput {top.throughput * single_s:.1f}x the "
        f"sequential single-query rate (goal >= 4x; an in-process batch of {top.clients} reaches "
        f"{ceiling * single_s:.1f}x, {top.throughput / ceiling:.0%} of which the server delivers), p99 "
        f"{top.pct(0.99) / single_s:.2f}x the single-query time (goal <= 3x), "
        f"{sum(r.errors for r in rounds)} errors (goal 0); kernel {kernel}, "
        f"torch threads {torch.get_num_threads()}"
    )
    bound = (
        f"{n_videos:,} videos, compute bound: a batch of {top.clients} is "
        f"{top.clients * n_videos * (CLIPS + 1) * DIM / 1e9:.1f} G multiply-adds; at this machine's fp32 "
        f"matrix-product peak ({peak:.1f} GMAC/s, same run) it takes at least {floor_s * 1e3:.0f} ms = "
        f"{floor_s / single_s:.2f}x the single-query time, the lowest p50 any exact scan allows here, and "
        f"{top.clients} clients get at most {top.clients / floor_s:.1f} q/s = "
        f"{top.clients * single_s / floor_s:.1f}x the single-query rate; the in-process batch of "
        f"{top.clients} ran at "
        f"{top.clients * n_videos * (CLIPS + 1) * DIM / batch_s.get(top.clients, float('nan')) / 1e9:.1f} "
        f"GMAC/s"
    )
    return [*rows, f"GOALS {goals}", f"GOALS {bound}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--queries", type=int, default=8, help="queries per client per round (default 8)")
    parser.add_argument("--singles", type=int, default=10, help="in-process single queries timed")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads, in-process and server alike (default: every core, as `mamfusion serve`)",
    )
    parser.add_argument("--linger-ms", type=float, default=50.0, help="batcher's convoy wait (default 50)")
    parser.add_argument("--work", help="keep the synthetic indexes in this folder and reuse them")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    try:
        for n in args.sizes:
            lines += bench_size(root, n, args.queries, args.clients, args.singles, args.linger_ms / 1e3)
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    print("| gallery | how | queries | throughput (q/s) | p50 (ms) | p99 (ms) | errors | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for line in lines:
        if not line.startswith("GOALS"):
            print(line)
    print()
    for line in lines:
        if line.startswith("GOALS"):
            print("- " + line.removeprefix("GOALS "))


if __name__ == "__main__":
    main()
