"""Exact top-k scoring of query vectors against blocks of index rows (the inner loop of `mamfusion search`).

A row is one video: its `n_clips` clip vectors then its pooled vector, all L2-normalised; a query's score is
`clip_w * max-clip cosine + video_w * pooled cosine` (MamFusion.score). Two kernels compute it:

- `matmul`: converts each stored sub-block to fp32 in a cache-sized buffer and multiplies. A batch of queries
  shares every conversion, so batches run at matrix-product speed.
- `fused`: one loop (compiled by torch.compile's C++ backend) that loads fp16 rows, widens them in registers
  and accumulates in fp32 - the index is read once at its stored size with no fp32 copy, so a single query
  runs near memory bandwidth (BENCHMARKS.md). Per extra query it reads the block again, so it serves 1-2
  queries; `pick_kernel` chooses.

Both compute exact fp32 dot products of the stored values, so they rank identically up to summation order.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Kernel = Literal["auto", "fused", "matmul"]
SUB_BLOCK_VIDEOS = 64  # 64 x 33 x 384 fp32 = 3.2 MB: the converted block stays in cache for its product
FUSED_MAX_QUERIES = 2  # from 3 queries on, one shared conversion + matrix product is faster (BENCHMARKS.md)
FUSED_MIN_INDEX_BYTES = 256 << 20  # below this a scan takes < 20 ms: not worth a compile (seconds, once)
PROBE_VIDEOS = 512  # the index's chunk size (storage.index.DEFAULT_CHUNK_ROWS): blocks arrive this size

ScoreFn = Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]]


class KernelUnavailableError(RuntimeError):
    """The fused kernel was asked for but cannot be compiled here (no C++ compiler, unsupported platform)."""


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


def _score_fused(queries: Tensor, block: Tensor, clip_w: float, video_w: float) -> tuple[Tensor, Tensor]:
    # written as broadcast-multiply-sum, not a product, so the compiler fuses load + widen + fma + reduce
    sims = (block.float()[None] * queries[:, None, None, :]).sum(-1)  # (B, m, n_clips + 1)
    clip, best = sims[..., :-1].max(dim=-1)
    return clip_w * clip + video_w * sims[..., -1], best


@functools.cache
def fused_scorer(rows: int, dim: int) -> ScoreFn:
    """The fused kernel for rows of `rows` x `dim` vectors, compiled and checked against `score_matmul`.

    Compiled once per row layout and process, on a full-size probe block: the compiler picks its loop tiling
    from the sizes it first sees, and a toy probe gave a kernel 3.7x slower on real blocks. Raises
    `KernelUnavailableError` (with the compiler's reason) where torch.compile cannot build it.
    """
    fn = torch.compile(_score_fused, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    probe = torch.nn.functional.normalize(torch.randn(PROBE_VIDEOS, rows, dim, generator=gen), dim=-1).half()
    with torch.inference_mode():  # as in scan_topk: a grad-mode change would compile it again
        query = torch.nn.functional.normalize(torch.randn(1, dim, generator=gen), dim=-1)
        try:
            got, _ = fn(query, probe, 0.7, 0.3)
        except Exception as e:  # torch raises compiler-specific types; all mean "not here"
            reason = (str(e).strip().splitlines() or ["no message"])[0]
            raise KernelUnavailableError(
                f"the fused search kernel could not be compiled ({type(e).__name__}: {reason}); "
                "use kernel='matmul' or install a C++ compiler"
            ) from e
        want, _ = score_matmul(query, probe, (0.7, 0.3))
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise KernelUnavailableError("the compiled fused search kernel disagrees with the matmul kernel")
    return fn


def pick_kernel(requested: Kernel, index_bytes: int, rows: int, dim: int) -> Literal["fused", "matmul"]:
    """`auto`: fused for indexes big enough to repay compiling it, if it compiles here; else matmul."""
    if requested == "matmul" or (requested == "auto" and index_bytes < FUSED_MIN_INDEX_BYTES):
        return "matmul"
    try:
        fused_scorer(rows, dim)
    except KernelUnavailableError as e:
        if requested == "fused":
            raise
        log.warning("%s; searching with the matmul kernel", e)
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
    The fused kernel is used for up to FUSED_MAX_QUERIES queries when `kernel` is "fused".
    """
    n_queries = queries.shape[0]
    use_fused = kernel == "fused" and n_queries <= FUSED_MAX_QUERIES
    k = min(top_k, int(alive.sum()))
    best = TopK(
        torch.empty(n_queries, 0),
        torch.empty(n_queries, 0, dtype=torch.long),
        torch.empty(n_queries, 0, dtype=torch.long),
    )
    buf = torch.empty(0)
    for start, block in blocks:
        m = block.shape[0]
        if use_fused:
            scores, clips = fused_scorer(*block.shape[1:])(queries, block, *weights)
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
