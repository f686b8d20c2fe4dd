"""Exact top-k scoring of query vectors against blocks of index rows (the inner loop of `mamfusion search`).

A row is one video: its `n_clips` clip vectors then its pooled vector, all L2-normalised; a query's score is
`clip_w * max-clip cosine + video_w * pooled cosine` (MamFusion.score). Two kernels compute it:

- `matmul`: converts each stored sub-block to fp32 in a cache-sized buffer and multiplies. A batch of queries
  shares every conversion, so large batches run at matrix-product speed.
- `fused` (fp16 indexes): a small C loop (`scan_fp16.c`, compiled with the machine's C compiler on first use
  and cached) that widens halves in registers and accumulates in fp32. The index is read once at its stored
  size with no fp32 copy, so a query runs near memory bandwidth (BENCHMARKS.md); it serves up to
  FUSED_MAX_QUERIES queries per pass, larger batches go to `matmul`.

Both compute exact fp32 dot products of the stored values, so they rank identically up to summation order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from storage.errors import MamFusionError

log = logging.getLogger(__name__)

Kernel = Literal["auto", "fused", "matmul"]
SUB_BLOCK_VIDEOS = 64  # 64 x 33 x 384 fp32 = 3.2 MB: the converted block stays in cache for its product
FUSED_MAX_QUERIES = 4  # from ~8 queries on, one shared conversion + matrix product is as fast (BENCHMARKS.md)
MIN_VIDEOS_PER_THREAD = 64  # 64 x 33 x 384 halves = 1.6 MB: a thread's share is worth its hand-off
KERNEL_SOURCE = Path(__file__).with_name("scan_fp16.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")


class KernelUnavailableError(MamFusionError, RuntimeError):
    """The fused kernel was asked for but cannot be built here (no C compiler, no fp16 vector support)."""


@dataclass(frozen=True)
class TopK:
    """Per query, the best rows of a scan in descending score order."""

    scores: Tensor  # (B, k) float32
    rows: Tensor  # (B, k) int64 index rows
    clips: Tensor  # (B, k) int64 best clip of each hit


def score_matmul(
    queries: Tensor, block: Tensor, weights: tuple[float, float], buf: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(B, d) against (m, n_clips + 1, d) -> scores (B, m) and best clip (B, m), by one matrix product.

    Stored fp16 rows are converted into the fp32 buffer `buf` (at least m * (n_clips + 1) rows), so the
    product runs on exact fp32 copies of the stored values.
    """
    m, rows, d = block.shape
    flat = block.reshape(m * rows, d)
    if flat.dtype != torch.float32:
        flat = flat.float() if buf is None else buf[: m * rows].copy_(flat)
    sims = torch.mm(queries, flat.T).view(-1, m, rows)
    clip, best = sims[..., :-1].max(dim=-1)
    return weights[0] * clip + weights[1] * sims[..., -1], best


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept between runs: `$XDG_CACHE_HOME/mamfusion/kernels` (default
    ~/.cache/...), or a per-user folder under the temp dir where that cannot be created (read-only home)."""
    preferred = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mamfusion" / "kernels"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    except OSError:
        return Path(tempfile.gettempdir()) / f"mamfusion-kernels-{os.getuid()}"


def _compile(source: Path, target: Path) -> None:
    """Build the shared library with `$CC` (default `cc`), writing it under a temporary name first."""
    compiler = os.environ.get("CC", "cc")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            out = subprocess.run(
                [compiler, *COMPILE_FLAGS, "-o", str(built), str(source)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelUnavailableError(f"C compiler {compiler!r} could not run: {e}") from e
        if out.returncode:
            first = next((line for line in out.stderr.splitlines() if "error" in line), out.stderr.strip())
            raise KernelUnavailableError(f"{compiler} could not build {source.name}: {first}")
        os.replace(built, target)  # atomic: a concurrent process loads a whole library or builds its own


def cpu_signature() -> str:
    """The CPU's instruction-set flags: `-march=native` builds for exactly these, so a library built on one
    machine (say, a shared home directory on a cluster) must not be loaded on a CPU that lacks one of them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


@functools.cache
def _native_library() -> ctypes.CDLL | KernelUnavailableError:
    """The compiled fused kernel (built once per machine and source version), checked on a probe block
    against `score_matmul`; or why it is unavailable."""
    source = KERNEL_SOURCE.read_bytes()
    build = " ".join([*COMPILE_FLAGS, platform.machine(), cpu_signature()])
    key = hashlib.sha256(source + build.encode()).hexdigest()
    target = kernel_cache_dir() / f"scan_fp16-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(KERNEL_SOURCE, target)
        lib = ctypes.CDLL(str(target))  # CDLL releases the GIL during calls: prefetch threads keep reading
    except (OSError, KernelUnavailableError) as e:
        return e if isinstance(e, KernelUnavailableError) else KernelUnavailableError(str(e))
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.scan_fp16.argtypes = [ptr, i64, i64, i64, ptr, i64, f32, f32, ptr, ptr]
    lib.scan_fp16.restype = None
    # d = 72 is no multiple of the unrolled width, so the leftover loops run as well
    gen = torch.Generator().manual_seed(0)
    probe = torch.nn.functional.normalize(torch.randn(3, 5, 72, generator=gen), dim=-1).half()
    queries = torch.nn.functional.normalize(torch.randn(2, 72, generator=gen), dim=-1)
    got, want = _run(lib, queries, probe, (0.7, 0.3)), score_matmul(queries, probe, (0.7, 0.3))
    if not (torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])):
        return KernelUnavailableError(f"{target} gives wrong scores; delete it to rebuild")
    return lib


def _run(
    lib: ctypes.CDLL, queries: Tensor, block: Tensor, weights: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    block, queries = block.contiguous(), queries.float().contiguous()
    m, rows, d = block.shape
    scores = torch.empty(len(queries), m)
    best = torch.empty(len(queries), m, dtype=torch.long)
    lib.scan_fp16(
        block.data_ptr(), m, rows, d, queries.data_ptr(), len(queries),
        weights[0], weights[1], scores.data_ptr(), best.data_ptr(),
    )  # fmt: skip
    return scores, best


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mamfusion-scan")


def score_fused(
    queries: Tensor, block: Tensor, weights: tuple[float, float], threads: int | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as `score_matmul`, for an fp16 block, through the compiled kernel.

    The block's videos are split over `threads` (default: torch's intra-op thread count, as the matmul kernel
    uses), each part one kernel call on its own thread - ctypes releases the GIL - so a many-core machine
    scans at the bandwidth of several cores, as a multi-threaded matrix product would.
    """
    lib = _native_library()
    if isinstance(lib, KernelUnavailableError):
        raise lib
    if block.dtype != torch.float16:
        raise TypeError(f"the fused kernel reads fp16 index rows, got {block.dtype}")
    if queries.shape[1] != block.shape[2]:
        raise ValueError(f"queries are {queries.shape[1]}-d, index rows {block.shape[2]}-d")
    parts = min(threads or torch.get_num_threads(), -(-len(block) // MIN_VIDEOS_PER_THREAD))
    if parts <= 1:
        return _run(lib, queries, block, weights)
    cuts = [len(block) * i // parts for i in range(parts + 1)]
    pieces = _pool(parts).map(
        lambda i: _run(lib, queries, block[cuts[i] : cuts[i + 1]], weights), range(parts)
    )
    scores, best = zip(*pieces, strict=True)
    return torch.cat(scores, dim=1), torch.cat(best, dim=1)


def pick_kernel(requested: Kernel, dtype: str) -> Literal["fused", "matmul"]:
    """`auto`: fused for fp16 indexes where the kernel builds, else matmul (with a warning saying why)."""
    if requested == "matmul" or (requested == "auto" and dtype != "float16"):
        return "matmul"
    problem = _native_library()
    if requested == "fused" and dtype != "float16":
        problem = KernelUnavailableError(f"the fused kernel reads fp16 indexes; this one is {dtype}")
    if isinstance(problem, KernelUnavailableError):
        if requested == "fused":
            raise problem
        log.warning("fused search kernel unavailable (%s); searching with the matmul kernel", problem)
        return "matmul"
    return "fused"


@torch.inference_mode()
def scan_topk(
    queries: Tensor,
    blocks: Iterable[tuple[int, Tensor]],
    alive: Tensor,
    top_k: int,
    weights: tuple[float, float],
    kernel: Literal["fused", "matmul"] = "matmul",
) -> TopK:
    """Exact top-k of every query over all alive rows, block by block, merging a running top-k.

    `queries` are L2-normalised (B, d) fp32; `blocks` yields `(first_row, (m, n_clips + 1, d))`; `weights` are
    (clip_scale_w, frame_scale_w). Memory: one block plus (B, block rows) scores, whatever the gallery size.
    """
    n_queries = queries.shape[0]
    fused = kernel == "fused" and n_queries <= FUSED_MAX_QUERIES
    k = min(top_k, int(alive.sum()))
    best = TopK(
        torch.empty(n_queries, 0),
        torch.empty(n_queries, 0, dtype=torch.long),
        torch.empty(n_queries, 0, dtype=torch.long),
    )
    buf = torch.empty(0)
    for start, block in blocks:
        m = block.shape[0]
        if fused:
            scores, clips = score_fused(queries, block, weights)
        else:
            if buf.shape[0] < SUB_BLOCK_VIDEOS * block.shape[1]:
                buf = torch.empty(SUB_BLOCK_VIDEOS * block.shape[1], block.shape[2])
            scores = torch.empty(n_queries, m)
            clips = torch.empty(n_queries, m, dtype=torch.long)
            for s in range(0, m, SUB_BLOCK_VIDEOS):
                e = min(s + SUB_BLOCK_VIDEOS, m)
                scores[:, s:e], clips[:, s:e] = score_matmul(queries, block[s:e], weights, buf)
        scores[:, ~alive[start : start + m]] = float("-inf")
        merged = torch.cat([best.scores, scores], dim=1)
        top, pos = merged.topk(min(k, merged.shape[1]), dim=1)
        rows = torch.cat([best.rows, torch.arange(start, start + m).expand(n_queries, m)], dim=1)
        best = TopK(top, rows.gather(1, pos), torch.cat([best.clips, clips], dim=1).gather(1, pos))
    return best
