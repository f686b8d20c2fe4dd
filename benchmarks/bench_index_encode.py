"""Index encoding on CPU: videos/s of `tasks.search.encode_for_index` (what `mamfusion index` runs per batch)
with the compiled selective scan vs the chunked PyTorch scan, in the same run on the same weights.

TVR preset (`models.config.load_preset("tvr")`: 3072-d frame features, max_ctx_l 512, hidden 384, 4 Mamba
layers of d_inner 768), random-init weights, synthetic features, batches of `--batch` videos as `build_index`
passes them. Two galleries:
  * `fixed`: every video has `--frames` rows (>= 512: the frame view is capped at max_ctx_l), so a batch is
    one forward pass of `--batch` videos at L = 512;
  * `mixed`: lengths uniform in [--min-frames, --max-frames], so `encode_for_index` (which only batches
    videos of equal frame-view length) runs most videos alone - the usual shape of a real gallery.
Runs are interleaved (compiled, chunked, compiled, ...), medians of `--repeats`; the max abs difference of
the index vectors between the two scans is printed as a check.

    .venv/bin/python benchmarks/bench_index_encode.py
    .venv/bin/python benchmarks/bench_index_encode.py --threads 1 --galleries fixed --videos 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from models.config import load_preset
from models.mamba import Mamba
from models.mamfusion import MamFusion
from models.selective_scan import compiled_path, compiled_paths
from tasks.search import encode_for_index


def gallery(kind: str, args: argparse.Namespace, dim: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Synthetic (features, clip times) per video: float32 rows with a shared direction, like real ones."""
    rng = np.random.default_rng(0)
    if kind == "fixed":
        lengths = [args.frames] * args.videos
    else:
        lengths = rng.integers(args.min_frames, args.max_frames + 1, args.videos).tolist()
    common = rng.standard_normal(dim).astype(np.float32)
    feats = [(rng.standard_normal((n, dim)) + common).astype(np.float32) for n in lengths]
    times = [np.stack([np.arange(n), np.arange(n) + 1], axis=1).astype(np.float32) for n in lengths]
    return feats, times


def set_scan(model: MamFusion, impl: str) -> None:
    """Every Mamba layer of the model onto one CPU scan ("compiled" or "torch", the chunked one)."""
    for module in model.modules():
        if isinstance(module, Mamba):
            module.impl = impl  # type: ignore[assignment]


def encode_all(model: MamFusion, feats: list[np.ndarray], times: list[np.ndarray], batch: int) -> np.ndarray:
    out = [
        encode_for_index(model, feats[i : i + batch], times[i : i + batch])[0]
        for i in range(0, len(feats), batch)
    ]
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--galleries", nargs="+", choices=["fixed", "mixed"], default=["fixed", "mixed"])
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="videos per encode_for_index call (build_index's)")
    p.add_argument("--frames", type=int, default=600, help="rows per video in the fixed gallery")
    p.add_argument("--min-frames", type=int, default=64)
    p.add_argument("--max-frames", type=int, default=800)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not compiled_paths():
        raise SystemExit("the compiled selective scan is not built here; nothing to compare")
    torch.manual_seed(0)
    cfg = load_preset("tvr").model
    model = MamFusion(cfg).eval()
    print(
        f"TVR preset: visual_dim {cfg.visual_dim}, max_ctx_l {cfg.max_ctx_l}, hidden {cfg.hidden_size}; "
        f"random init; torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"compiled path {compiled_path()}; batches of {args.batch}, median of {args.repeats} interleaved "
        "runs\n"
    )
    print("| gallery | videos | compiled scan videos/s | chunked scan videos/s | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in args.galleries:
        feats, times = gallery(kind, args, cfg.visual_dim)
        for impl in ("compiled", "torch"):  # warm-up: allocator, self-check, one-off dispatch costs
            set_scan(model, impl)
            encode_all(model, feats[: args.batch], times[: args.batch], args.batch)
        walls: dict[str, list[float]] = {"compiled": [], "torch": []}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for impl in walls:
                set_scan(model, impl)
                start = time.perf_counter()
                vectors[impl] = encode_all(model, feats, times, args.batch)
                walls[impl].append(time.perf_counter() - start)
        rate = {impl: len(feats) / statistics.median(w) for impl, w in walls.items()}
        diff = float(np.abs(vectors["compiled"] - vectors["torch"]).max())
        shape = f"{args.frames} rows" if kind == "fixed" else f"{args.min_frames}-{args.max_frames} rows"
        print(
            f"| {kind} ({shape}) | {len(feats)} | {rate['compiled']:.1f} | {rate['torch']:.1f} | "
            f"{rate['compiled'] / rate['torch']:.2f}x | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
