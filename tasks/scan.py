"""Exact top-k scoring of query vectors against blocks of index rows (the inner loop of `mamfusion search`).

A row is one video: its `n_clips` clip vectors then its pooled vector, all L2-normalised; a query's score is
`clip_w * max-clip cosine + video_w * pooled cosine` (MamFusion.score). Two kernels compute it:

- `matmul`: converts each stored sub-block to fp32 in a cache-sized buffer and multiplies. A batch of queries
  shares every conversion, so large batches run at matrix-product speed.
- `fused` (fp16 indexes): a small C loop that widens halves in registers and accumulates in fp32. The index
  is read once at its stored size with no fp32 copy, so a query runs near memory bandwidth (BENCHMARKS.md).
  Several queries are scored together in register tiles (a small matrix product per video, the next
  video prefetched meanwhile), so a batch costs little more than one query until the arithmetic, not the
  memory, bounds it; larger batches run in passes of FUSED_QUERY_PASS queries. It is the
  extension module `tasks._scan_fp16` (`_scan_fp16.c`), built when the package is installed and imported
  from the package's own directory only; nothing is compiled at run time. Built for the architecture's
  baseline, it picks its vector path (AVX2 + F16C + FMA, else portable C) from the CPU at run time.
  Where the install had no C compiler it is absent, and `auto` searches with `matmul`. A query vector's
  scores do not depend on what it is batched with: each (row, query) cosine is the same fixed sum in every
  loop, so a server batch scores a query as a lone search does (the text encoder's padded batches may still
  move the vector itself by an ulp or so).

Both compute exact fp32 dot products of the stored values, so they rank identically up to summation order.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from models.extensions import load_extension
from storage.errors import MamFusionError

log = logging.getLogger(__name__)

Kernel = Literal["auto", "fused", "matmul"]
SUB_BLOCK_VIDEOS = 64  # 64 x 33 x 384 fp32 = 3.2 MB: the converted block stays in cache for its product
FUSED_QUERY_PASS = 64  # queries per fused pass: tiles gain nothing beyond, and the queries stay in L2
EXTENSION = "tasks._scan_fp16"
PACKAGE_DIR = Path(__file__).resolve().parent
PATHS = ("avx2", "portable")  # every path the extension has, best first (x86 has both)
PATH_ENV = "MAMFUSION_FUSED_PATH"  # forces one of PATHS
INSTALL_HINT = (
    "reinstall mamfusion where a C compiler works (`pip install -e .` or `make env`) to build it, "
    "or search with --kernel matmul"
)


class KernelUnavailableError(MamFusionError, RuntimeError):
    """The fused kernel was asked for but cannot run here (not built at install, or path unsupported)."""


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


def _import_extension() -> ModuleType:
    """The compiled module, from its file in this package's directory only (`models.extensions`)."""
    return load_extension(EXTENSION, PACKAGE_DIR)


@functools.cache
def _extension() -> ModuleType | KernelUnavailableError:
    """The fused kernel's extension module, or why it cannot be used (remembered: the install does not change
    while the process runs)."""
    try:
        return _import_extension()
    except ImportError as e:
        return KernelUnavailableError(
            f"the fused search kernel (extension module {EXTENSION}) is not part of this installation ({e}); "
            f"{INSTALL_HINT}"
        )


def fused_paths() -> tuple[str, ...]:
    """The fused kernel's code paths this CPU can run, best first (empty without the extension)."""
    ext = _extension()
    return () if isinstance(ext, KernelUnavailableError) else tuple(ext.paths())


def fused_path() -> str:
    """The code path the fused kernel runs: `$MAMFUSION_FUSED_PATH` where set (to compare paths, or to pin one
    across machines), else the best this CPU supports."""
    ext = _extension()
    if isinstance(ext, KernelUnavailableError):
        raise ext
    supported = fused_paths()
    forced = os.environ.get(PATH_ENV)
    if not forced:
        return supported[0]
    if forced not in supported:
        why = "not supported by this CPU" if forced in PATHS else "unknown"
        raise KernelUnavailableError(
            f"{PATH_ENV}={forced}: that fused kernel path is {why} (here: {', '.join(supported)})"
        )
    return forced


@functools.cache
def _self_check(ext: ModuleType, path: str) -> KernelUnavailableError | None:
    """Run `path` once on a probe block against `score_matmul`: a miscompiled or mis-dispatched kernel must
    never rank a real search."""
    # d = 93 is odd and no multiple of any path's vector widths, so every leftover loop runs as well; one
    # query takes the single-query loop (9 videos: two per stream and one left over), six the tiled one
    # with a full and a partial tile of rows and queries
    gen = torch.Generator().manual_seed(0)
    probe = torch.nn.functional.normalize(torch.randn(9, 5, 93, generator=gen), dim=-1).half()
    queries = torch.nn.functional.normalize(torch.randn(6, 93, generator=gen), dim=-1)
    for batch in (queries[:1], queries):
        got, want = _run(ext, path, batch, probe, (0.7, 0.3)), score_matmul(batch, probe, (0.7, 0.3))
        if not (torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])):
            return KernelUnavailableError(
                f"the fused kernel's {path} path gives wrong scores on this machine"
            )
    log.debug("fused search kernel: %s path", path)
    return None


def _kernel(path: str | None = None) -> tuple[ModuleType, str]:
    """The extension and `path` (default: `fused_path()`) once that path has passed its self-check; else
    KernelUnavailableError saying why not."""
    ext = _extension()
    if isinstance(ext, KernelUnavailableError):
        raise ext
    path = path or fused_path()
    if path not in fused_paths():
        here = ", ".join(fused_paths())
        raise KernelUnavailableError(
            f"fused kernel path {path!r} is not available on this CPU (here: {here})"
        )
    problem = _self_check(ext, path)
    if problem is not None:
        raise problem
    return ext, path


def _run(
    ext: ModuleType, path: str, queries: Tensor, block: Tensor, weights: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    block, queries = block.detach().contiguous(), queries.detach().float().contiguous()
    m, rows, d = block.shape
    scores = torch.empty(len(queries), m)
    best = torch.empty(len(queries), m, dtype=torch.long)
    # buffers, not raw pointers: the module checks every size and type itself, and releases the GIL
    ext.scan(block.numpy(), rows, d, queries.numpy(), *weights, scores.numpy(), best.numpy(), path)
    return scores, best


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mamfusion-scan")


def score_fused(
    queries: Tensor, block: Tensor, weights: tuple[float, float], path: str | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as `score_matmul`, for an fp16 block, through the compiled kernel on this thread (the
    module releases the GIL, so `scan_topk` runs one block per thread). `path` picks the code path (default:
    `fused_path()`), so tests can compare them all."""
    ext, path = _kernel(path)
    if block.dtype != torch.float16:
        raise TypeError(f"the fused kernel reads fp16 index rows, got {block.dtype}")
    if queries.shape[1] != block.shape[2]:
        raise ValueError(f"queries are {queries.shape[1]}-d, index rows {block.shape[2]}-d")
    return _run(ext, path, queries, block, weights)


@functools.cache
def _note_fallback(reason: str) -> None:
    """Say once per process (and reason), on one line, that `auto` searches without the fused kernel."""
    log.warning("fused search kernel unavailable (%s); searching with the matmul kernel", reason)


def pick_kernel(requested: Kernel, dtype: str) -> Literal["fused", "matmul"]:
    """`auto`: fused for fp16 indexes where the extension is installed and passes its self-check, else matmul
    (noting why, once); `fused` raises KernelUnavailableError instead of falling back."""
    if requested == "matmul" or (requested == "auto" and dtype != "float16"):
        return "matmul"
    if dtype != "float16":
        raise KernelUnavailableError(f"the fused kernel reads fp16 indexes; this one is {dtype}")
    try:
        _kernel()
    except KernelUnavailableError as e:
        if requested == "fused":
            raise
        _note_fallback(str(e))
        return "matmul"
    return "fused"


def _merge(best: TopK, new: TopK, k: int) -> TopK:
    """The k best of two candidate sets by score, equal scores in row order: the same rows in the same order
    whichever thread merged which blocks, so a scan does not depend on its thread count."""
    scores = torch.cat([best.scores, new.scores], dim=1)
    rows = torch.cat([best.rows, new.rows], dim=1)
    clips = torch.cat([best.clips, new.clips], dim=1)
    by_row = rows.argsort(dim=1, stable=True)
    scores, rows, clips = scores.gather(1, by_row), rows.gather(1, by_row), clips.gather(1, by_row)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return TopK(scores.gather(1, order), rows.gather(1, order), clips.gather(1, order))


@torch.inference_mode()
def scan_topk(
    queries: Tensor,
    blocks: Iterable[tuple[int, Tensor]],
    alive: Tensor,
    top_k: int,
    weights: tuple[float, float],
    kernel: Literal["fused", "matmul"] = "matmul",
    threads: int | None = None,
) -> TopK:
    """Exact top-k of every query over all alive rows, block by block, merging a running top-k.

    `queries` are L2-normalised (B, d) fp32; `blocks` yields `(first_row, (m, n_clips + 1, d))`; `weights` are
    (clip_scale_w, frame_scale_w). Memory: one block per thread plus (B, block rows) scores, whatever the
    gallery size. The fused kernel runs on `threads` (default: torch's intra-op thread count, as the matrix
    product uses) that each take the next block when done with theirs and keep their own top-k, merged at
    the end: no thread waits for another until the last block, and a streamed block is read while the
    others' are scored. The result is the same for any thread count.
    """
    n_queries = queries.shape[0]
    fused = kernel == "fused"
    k = min(top_k, int(alive.sum()))
    empty = TopK(
        torch.empty(n_queries, 0),
        torch.empty(n_queries, 0, dtype=torch.long),
        torch.empty(n_queries, 0, dtype=torch.long),
    )

    def block_top(start: int, block: Tensor) -> TopK:
        if fused:
            passes = [score_fused(q, block, weights) for q in queries.split(FUSED_QUERY_PASS)]
            scores, clips = (torch.cat(parts) for parts in zip(*passes, strict=True))
        else:
            scores, clips = _score_matmul_blocked(queries, block, weights)
        m = block.shape[0]
        scores.masked_fill_(~alive[start : start + m], float("-inf"))
        top, pos = scores.topk(min(k, m), dim=1)
        return TopK(top, pos + start, clips.gather(1, pos))

    workers = (threads or torch.get_num_threads()) if fused else 1
    if workers <= 1:
        best = empty
        for start, block in blocks:
            best = _merge(best, block_top(start, block), k)
        return best
    source, lock = iter(blocks), threading.Lock()

    @torch.inference_mode()  # thread-local, as the caller's is
    def worker(_: int) -> TopK:
        best = empty
        while True:
            with lock:  # a streamed block is read here, while the other threads score theirs
                item = next(source, None)
            if item is None:
                return best
            best = _merge(best, block_top(*item), k)

    return functools.reduce(lambda a, b: _merge(a, b, k), _pool(workers).map(worker, range(workers)), empty)


def _score_matmul_blocked(
    queries: Tensor, block: Tensor, weights: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """`score_matmul` over cache-sized sub-blocks of SUB_BLOCK_VIDEOS, sharing one fp32 conversion buffer."""
    m, rows, d = block.shape
    buf = torch.empty(SUB_BLOCK_VIDEOS * rows, d)
    scores = torch.empty(queries.shape[0], m)
    clips = torch.empty(queries.shape[0], m, dtype=torch.long)
    for s in range(0, m, SUB_BLOCK_VIDEOS):
        e = min(s + SUB_BLOCK_VIDEOS, m)
        scores[:, s:e], clips[:, s:e] = score_matmul(queries, block[s:e], weights, buf)
    return scores, clips
