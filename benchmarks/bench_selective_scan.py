"""Selective scan forward+backward on CPU: the compiled kernel and the chunked PyTorch scan vs the sequential
reference, all in the same run.

Shapes follow MamFusion's Mamba layers (d_inner 768, d_state 16) with the issue's batch of 16; inputs are
(batch, d_inner, L) contiguous, mamba_ssm's convention. Runs are interleaved (reference, chunked, compiled,
reference, ...) so a shared machine's load hits all alike; medians reported. Speed-ups are reference time over
each scan's time, by wall and by CPU time (steadier on a shared machine).

    .venv/bin/python benchmarks/bench_selective_scan.py --lengths 512              # the issue's measurement
    .venv/bin/python benchmarks/bench_selective_scan.py                            # all L
    .venv/bin/python benchmarks/bench_selective_scan.py --no-reference --chunks 8 16 32 64   # choose K
    .venv/bin/python benchmarks/bench_selective_scan.py --no-reference --scans compiled --kernel-chunks 16 64
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

import models.selective_scan as scan_module
from models.selective_scan import DEFAULT_CHUNK, selective_scan, sequential_selective_scan

Scan = Callable[..., torch.Tensor]


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


def scans(args: argparse.Namespace) -> dict[str, Scan]:
    """The timed scans by column name: chunked per K, compiled per kernel chunk (if built)."""
    out: dict[str, Scan] = {}
    if "chunked" in args.scans:
        for k in args.chunks:
            out[f"chunked K={k}"] = functools.partial(selective_scan, chunk_size=k, impl="torch")
    if "compiled" in args.scans and scan_module.compiled_paths():
        scan_module._kernel()  # its one-off self-check, outside the timings
        for k in args.kernel_chunks:
            out[f"compiled ({scan_module.compiled_path()}, chunk {k})"] = functools.partial(
                scan_module._compiled_scan, chunk=k
            )
    return out


def peak_extra_mib(which: str, args: argparse.Namespace, length: int) -> float:
    """Peak memory of one forward+backward above the inputs, in a fresh process (so no allocator reuse)."""
    cmd = [sys.executable, __file__, "--peak-of", which, "--lengths", str(length), "--batch", str(args.batch)]
    cmd += ["--d-inner", str(args.d_inner), "--d-state", str(args.d_state), "--threads", str(args.threads)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def measure_peak(which: str, args: argparse.Namespace) -> None:
    """Child side of `peak_extra_mib`: prints max RSS during the call minus RSS before it (MiB)."""
    inputs = make_inputs(args.batch, args.d_inner, args.d_state, args.lengths[0])
    fn = {"reference": sequential_selective_scan, "chunked": functools.partial(selective_scan, impl="torch")}
    before = psutil.Process().memory_info().rss
    fwd_bwd(fn.get(which, functools.partial(selective_scan, impl="compiled")), inputs)
    # VmHWM (Linux): this process's own peak; ru_maxrss would also count the parent's peak from before exec.
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print((peak_kib * 1024 - before) / 2**20)


def fwd_bwd(fn: Scan, inputs: dict[str, torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """Wall s and CPU s of one forward+backward, and the output (for the equality check)."""
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
    p.add_argument("--scans", nargs="+", choices=["chunked", "compiled"], default=["chunked", "compiled"])
    p.add_argument("--chunks", type=int, nargs="+", default=[DEFAULT_CHUNK], help="chunked scan's K values")
    p.add_argument("--kernel-chunks", type=int, nargs="+", default=[scan_module.KERNEL_CHUNK])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-inner", type=int, default=768)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="skip the sequential reference (sweeps)")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--peak-of", choices=["reference", "chunked", "compiled"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        return measure_peak(args.peak_of, args)
    ref = not args.no_reference
    timed = scans(args)
    if "compiled" in args.scans and not scan_module.compiled_paths():
        print("(compiled scan not built here: only the chunked scan is timed)")

    print(
        f"B={args.batch} d_inner={args.d_inner} d_state={args.d_state} float32, torch {torch.__version__}, "
    )
    print(f"threads={torch.get_num_threads()}; forward+backward, median of {args.repeats} interleaved runs,")
    print("cells: wall s / CPU s; speed-up: reference / scan, wall / CPU\n")
    warm = make_inputs(args.batch, args.d_inner, args.d_state, 32)
    for fn in (
        sequential_selective_scan,
        *timed.values(),
    ):  # first calls pay one-off allocator/dispatch costs
        fwd_bwd(fn, warm)
    cols = (["reference"] if ref else []) + list(timed)
    if ref:
        cols += [f"speed-up {name}" for name in timed] + ["max rel. err (y, grads)"]
        cols += [] if args.no_peak else ["peak MiB ref / chunked / compiled"]
    print("| L | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for length in args.lengths:
        inputs = make_inputs(args.batch, args.d_inner, args.d_state, length)
        runs: dict[str, list[tuple[float, float]]] = {}
        errs: dict[str, float] = {}
        for _ in range(args.repeats):
            if ref:
                wall, cpu, y_ref = fwd_bwd(sequential_selective_scan, inputs)
                grads_ref = [x.grad.clone() for x in inputs.values()]
                runs.setdefault("reference", []).append((wall, cpu))
            for name, fn in timed.items():
                wall, cpu, y = fwd_bwd(fn, inputs)
                runs.setdefault(name, []).append((wall, cpu))
                if ref:
                    grads = [rel_err(a.grad, b) for a, b in zip(inputs.values(), grads_ref, strict=True)]
                    errs[name] = max(errs.get(name, 0.0), rel_err(y, y_ref), *grads)
        med = {key: [statistics.median(r[i] for r in v) for i in (0, 1)] for key, v in runs.items()}
        cells = [
            f"{med[key][0]:.3f} / {med[key][1]:.3f}" for key in (["reference"] if ref else []) + list(timed)
        ]
        if ref:
            for name in timed:
                ratio = [med["reference"][i] / med[name][i] for i in (0, 1)]
                cells.append(f"**{ratio[0]:.1f}x** / {ratio[1]:.1f}x")
            cells.append(" / ".join(f"{errs[name]:.1e}" for name in timed))
            if not args.no_peak:
                which = ["reference", "chunked"] + (["compiled"] if scan_module.compiled_paths() else [])
                cells.append(" / ".join(f"{peak_extra_mib(w, args, length):.0f}" for w in which))
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
