"""One MamFusion training step (forward + backward + BertAdam) at TVR dimensions on CPU, with peak memory.

TVR preset (visual 3072, query 768, hidden 384, 8 heads, dropout on); each video has T = 128 feature rows
(frame branch length 128, clip branch 32) and 5 captions of 20 tokens. Baseline in the same run: the same step
without the Mamba units (`use_mamba=False`, the GMMFormer backbone). Every configuration runs in its own
subprocess so its peak RSS (`ru_maxrss`) is its own. Step times are medians of the timed steps, as wall
clock and as process CPU time (with 1 thread, CPU time is what an idle machine's wall clock would show; it
is robust to other load on a shared machine, so the ratio uses it).

    .venv/bin/python benchmarks/bench_train_step.py                 # batch sizes 8 and 32, 1 thread
    .venv/bin/python benchmarks/bench_train_step.py --batches 8 --steps 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from models.losses import MamFusionLoss
from models.mamfusion import MamFusion
from models.optim import BertAdam, param_groups
from models.preprocess import collate_queries, collate_videos

CAPTIONS, TOKENS = 5, 20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(batch: int, rows: int, use_mamba: bool, steps: int, threads: int) -> dict:
    """Build the model and data, run one untimed step, then `steps` timed ones; report times and peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MamFusion.from_preset("tvr", use_mamba=use_mamba, mamba_impl="torch").train()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    videos = collate_videos(
        [torch.randn(rows, cfg.visual_dim, generator=g) for _ in range(batch)], cfg.map_size, cfg.max_ctx_l
    )
    queries = collate_queries(
        [torch.randn(TOKENS, cfg.query_dim, generator=g) for _ in range(batch * CAPTIONS)], cfg.max_desc_l
    )
    labels = [v for v in range(batch) for _ in range(CAPTIONS)]
    criterion = MamFusionLoss(cfg)
    opt = BertAdam(param_groups(model, 0.01), lr=4.5e-4, warmup=0.01, t_total=1000)
    rss_before = peak_rss_mib()
    wall, cpu = [], []
    for i in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.zero_grad()
        total, _ = criterion(model(videos, queries, labels), labels, hard_negative=True, generator=g)
        total.backward()
        opt.step()
        if i:  # the first step warms up allocators and caches
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {
        "wall_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
        "rss_mib": peak_rss_mib(),
        "rss_model_mib": rss_before,
    }


def run_in_subprocess(args: argparse.Namespace, batch: int, use_mamba: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(batch), str(int(use_mamba))]
    cmd += ["--rows", str(args.rows), "--steps", str(args.steps), "--threads", str(args.threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="videos per batch")
    p.add_argument("--rows", type=int, default=128, help="feature rows T per video")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.rows, bool(args.worker[1]), args.steps, args.threads)))
        return
    print(
        f"TVR dims, T={args.rows} rows/video, {CAPTIONS} captions x {TOKENS} tokens, "
        f"{args.threads} thread(s)\n"
    )
    print(
        "| videos | captions | model | step CPU (s) | step wall (s) | vs no-Mamba "
        "| peak RSS (MiB) | RSS before (MiB) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        base = run_in_subprocess(args, batch, use_mamba=False)
        full = run_in_subprocess(args, batch, use_mamba=True)
        for name, r in (("GMMFormer backbone (use_mamba=False)", base), ("MamFusion", full)):
            ratio = r["cpu_s"] / base["cpu_s"]
            print(
                f"| {batch} | {batch * CAPTIONS} | {name} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} "
                f"| {ratio:.2f}x | {r['rss_mib']:.0f} | {r['rss_model_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
