"""Selective scan forward+backward on CPU: the chunked `selective_scan` vs the sequential reference.

Shapes follow MamFusion's Mamba layers (d_inner 768, d_state 16) with the issue's batch of 16. Runs are
interleaved (reference, fast, reference, ...) so a shared machine's load hits both alike; medians reported.

    .venv/bin/python benchmarks/bench_selective_scan.py                    # reference vs chunked, all L
    .venv/bin/python benchmarks/bench_selective_scan.py --no-reference --chunks 8 16 32 64 128   # choose K
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from models.selective_scan import DEFAULT_CHUNK, selective_scan, sequential_selective_scan


def make_inputs(
    batch: int, d_inner: int, d_state: int, length: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs as Mamba produces them: raw delta + bias through softplus, A = -(1..d_state)-like, gate z."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    return {
        "u": rnd(batch, d_inner, length),
        "delta": rnd(batch, d_inner, length, scale=0.5),
        "A": A.requires_grad_(),
        "B": rnd(batch, d_state, length),
        "C": rnd(batch, d_state, length),
        "D": torch.ones(d_inner, requires_grad=True),
        "z": rnd(batch, d_inner, length),
        "delta_bias": rnd(d_inner, scale=0.5),
    }


def peak_extra_mib(which: str, args: argparse.Namespace, length: int) -> float:
    """Peak memory of one forward+backward above the inputs, in a fresh process (so no allocator reuse)."""
    cmd = [sys.executable, __file__, "--peak-of", which, "--lengths", str(length), "--batch", str(args.batch)]
    cmd += ["--d-inner", str(args.d_inner), "--d-state", str(args.d_state), "--threads", str(args.threads)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def measure_peak(which: str, args: argparse.Namespace) -> None:
    """Child side of `peak_extra_mib`: prints max RSS during the call minus RSS before it (MiB)."""
    inputs = make_inputs(args.batch, args.d_inner, args.d_state, args.lengths[0])
    before = psutil.Process().memory_info().rss
    fwd_bwd(sequential_selective_scan if which == "reference" else selective_scan, inputs)
    # VmHWM (Linux): this process's own peak; ru_maxrss would also count the parent's peak from before exec.
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print((peak_kib * 1024 - before) / 2**20)


def fwd_bwd(
    fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
) -> tuple[float, float, float, torch.Tensor]:
    """Wall s, CPU s and peak extra MiB of one forward+backward, and the output (for the equality check)."""
    for t in inputs.values():
        t.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    y = fn(**inputs, delta_softplus=True)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - wall, time.process_time() - cpu, y.detach()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 512, 1024])
    p.add_argument("--chunks", type=int, nargs="+", default=[DEFAULT_CHUNK], help="chunk sizes K to time")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-inner", type=int, default=768)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="time only the chunked scan (chunk sweeps)")
    p.add_argument("--peak-of", choices=["reference", "chunked"], help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        return measure_peak(args.peak_of, args)
    ref = not args.no_reference

    print(
        f"B={args.batch} d_inner={args.d_inner} d_state={args.d_state} float32, torch {torch.__version__}, "
    )
    print(f"threads={torch.get_num_threads()}; forward+backward, median of {args.repeats} interleaved runs,")
    print("cells: wall s / CPU s (CPU time is steadier on a shared machine); speedup: fastest K by CPU s\n")
    warm = make_inputs(args.batch, args.d_inner, args.d_state, 32)
    for fn in (sequential_selective_scan, selective_scan):  # first calls pay one-off allocator/dispatch costs
        fwd_bwd(fn, warm)
    cols = (["reference"] if ref else []) + [f"chunked K={k}" for k in args.chunks]
    cols += (
        ["speedup wall / CPU", f"peak MiB ref / K={DEFAULT_CHUNK}", "max rel. err (y, grads)"] if ref else []
    )
    print("| L | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for length in args.lengths:
        inputs = make_inputs(args.batch, args.d_inner, args.d_state, length)
        runs: dict[str | int, list[tuple[float, float]]] = {}
        err = 0.0
        for _ in range(args.repeats):
            if ref:
                wall, cpu, y_ref = fwd_bwd(sequential_selective_scan, inputs)
                grads_ref = [x.grad.clone() for x in inputs.values()]
                runs.setdefault("ref", []).append((wall, cpu))
            for k in args.chunks:
                wall, cpu, y = fwd_bwd(functools.partial(selective_scan, chunk_size=k), inputs)
                runs.setdefault(k, []).append((wall, cpu))
                if ref:
                    errs = [rel_err(a.grad, b) for a, b in zip(inputs.values(), grads_ref, strict=True)]
                    err = max(err, rel_err(y, y_ref), *errs)
        med = {key: [statistics.median(r[i] for r in v) for i in (0, 1)] for key, v in runs.items()}
        cells = [f"{med[key][0]:.3f} / {med[key][1]:.3f}" for key in (["ref"] if ref else []) + args.chunks]
        if ref:
            best = min(args.chunks, key=lambda k: med[k][1])
            cells.append(f"{med['ref'][0] / med[best][0]:.1f}x / {med['ref'][1] / med[best][1]:.1f}x")
            mib = [peak_extra_mib(which, args, length) for which in ("reference", "chunked")]
            cells.append(f"{mib[0]:.0f} / {mib[1]:.0f}")
            cells.append(f"{err:.1e}")
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
