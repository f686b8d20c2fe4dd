"""Scoring kernels of the search scan (tasks/scan.py): both kernels against a brute-force float64 reference,
kernel choice, and the fallback when the fused kernel cannot be compiled."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.functional import normalize

from tasks import scan
from tasks.scan import KernelUnavailableError, fused_scorer, pick_kernel, scan_topk

WEIGHTS = (0.7, 0.3)


def _gallery(n: int = 50, rows: int = 5, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vectors = normalize(torch.randn(n, rows, d, generator=g), dim=-1)
    alive = torch.ones(n, dtype=torch.bool)
    alive[[3, 17, 44]] = False
    return vectors, alive


def _brute(queries: torch.Tensor, vectors: torch.Tensor, alive: torch.Tensor, k: int):
    sims = torch.einsum("qd,vnd->qvn", queries.double(), vectors.double())
    scores = WEIGHTS[0] * sims[..., :-1].max(-1).values + WEIGHTS[1] * sims[..., -1]
    clips = sims[..., :-1].argmax(-1)
    scores[:, ~alive] = float("-inf")
    top = scores.topk(k, dim=1)
    return top.values.float(), top.indices, clips.gather(1, top.indices)


@pytest.mark.parametrize("kernel", ["matmul", "fused"])
@pytest.mark.parametrize("n_queries", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernels_match_brute_force_across_blocks_and_tombstones(kernel, n_queries, dtype):
    vectors, alive = _gallery()
    stored = vectors.to(dtype)
    queries = normalize(torch.randn(n_queries, 24, generator=torch.Generator().manual_seed(1)), dim=-1)
    want_scores, want_rows, want_clips = _brute(queries, stored.float(), alive, 7)
    blocks = [(s, stored[s : s + 6]) for s in range(0, 50, 6)]  # odd block size, short last block
    got = scan_topk(queries, blocks, alive, 7, WEIGHTS, kernel)
    assert torch.equal(got.rows, want_rows) and torch.equal(got.clips, want_clips)
    torch.testing.assert_close(got.scores, want_scores, rtol=1e-6, atol=1e-6)
    one_block = scan_topk(queries, [(0, stored)], alive, 100, WEIGHTS, kernel)
    assert one_block.rows.shape == (n_queries, 47)  # k capped by the alive rows
    assert not (~alive)[one_block.rows].any()


def test_fused_kernel_reads_fp16_exactly_like_matmul_on_a_realistic_block():
    """384-d, 33 vectors per video, a full 512-row block: same rows, scores equal to fp32 rounding."""
    vectors, _ = _gallery(n=512, rows=33, d=384, seed=2)
    stored = vectors.half()
    queries = normalize(torch.randn(2, 384, generator=torch.Generator().manual_seed(3)), dim=-1)
    alive = torch.ones(512, dtype=torch.bool)
    fused = scan_topk(queries, [(0, stored)], alive, 512, WEIGHTS, "fused")
    matmul = scan_topk(queries, [(0, stored)], alive, 512, WEIGHTS, "matmul")
    torch.testing.assert_close(fused.scores, matmul.scores, rtol=0, atol=2e-6)
    assert (fused.rows == matmul.rows).float().mean() > 0.99  # only float near-ties may swap


def test_auto_picks_fused_only_for_large_indexes():
    assert pick_kernel("auto", scan.FUSED_MIN_INDEX_BYTES - 1, 5, 24) == "matmul"
    assert pick_kernel("auto", scan.FUSED_MIN_INDEX_BYTES, 5, 24) == "fused"
    assert pick_kernel("matmul", 1 << 40, 5, 24) == "matmul"
    assert pick_kernel("fused", 0, 5, 24) == "fused"


def test_uncompilable_fused_kernel_falls_back_or_fails_clearly(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused_scorer.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.scan"):
            assert pick_kernel("auto", 1 << 40, 5, 24) == "matmul"
        assert "No working C++ compiler found); use kernel='matmul'" in caplog.text
        assert "searching with the matmul kernel" in caplog.text
        with pytest.raises(KernelUnavailableError, match="could not be compiled .RuntimeError"):
            pick_kernel("fused", 0, 5, 24)
    finally:
        fused_scorer.cache_clear()
