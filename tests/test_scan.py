"""Scoring kernels of the search scan (tasks/scan.py): both kernels against a brute-force float64 reference,
kernel choice, the build cache, and clear fallbacks where the fused kernel cannot be built."""

from __future__ import annotations

import logging
import os
import platform

import pytest
import torch
from torch.nn.functional import normalize

from tasks import scan
from tasks.scan import KernelUnavailableError, pick_kernel, scan_topk, score_fused

WEIGHTS = (0.7, 0.3)
x86 = pytest.mark.skipif(platform.machine() != "x86_64", reason="selects x86 vector paths by compiler flags")


@pytest.fixture
def fresh_kernel_cache(tmp_path, monkeypatch):
    """An empty kernel cache and no remembered build, so each test builds (or fails to build) its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scan._native_library.cache_clear()
    yield tmp_path
    scan._native_library.cache_clear()


def _gallery(n: int = 50, rows: int = 5, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vectors = normalize(torch.randn(n, rows, d, generator=g), dim=-1)
    alive = torch.ones(n, dtype=torch.bool)
    alive[[i for i in (3, 17, 44) if i < n]] = False
    return vectors, alive


def _brute(queries: torch.Tensor, vectors: torch.Tensor, alive: torch.Tensor, k: int):
    sims = torch.einsum("qd,vnd->qvn", queries.double(), vectors.double())
    scores = WEIGHTS[0] * sims[..., :-1].max(-1).values + WEIGHTS[1] * sims[..., -1]
    clips = sims[..., :-1].argmax(-1)
    scores[:, ~alive] = float("-inf")
    top = scores.topk(k, dim=1)
    return top.values.float(), top.indices, clips.gather(1, top.indices)


@pytest.mark.parametrize(
    ("kernel", "dtype"),
    [("matmul", torch.float16), ("matmul", torch.float32), ("fused", torch.float16)],
)
@pytest.mark.parametrize("n_queries", [1, 3, 9])  # 9 > FUSED_MAX_QUERIES: the fused scan hands over to matmul
@pytest.mark.parametrize("d", [24, 384])  # 24 is below one unrolled step; 384 is the paper's width
def test_kernels_match_brute_force_across_blocks_and_tombstones(kernel, dtype, n_queries, d):
    vectors, alive = _gallery(d=d)
    stored = vectors.to(dtype)
    queries = normalize(torch.randn(n_queries, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    want_scores, want_rows, want_clips = _brute(queries, stored.float(), alive, 7)
    blocks = [(s, stored[s : s + 6]) for s in range(0, 50, 6)]  # odd block size, short last block
    got = scan_topk(queries, blocks, alive, 7, WEIGHTS, kernel)
    assert torch.equal(got.rows, want_rows) and torch.equal(got.clips, want_clips)
    torch.testing.assert_close(got.scores, want_scores, rtol=1e-6, atol=1e-6)
    one_block = scan_topk(queries, [(0, stored)], alive, 100, WEIGHTS, kernel)
    assert one_block.rows.shape == (n_queries, 47)  # k capped by the alive rows
    assert not (~alive)[one_block.rows].any()


def test_fused_kernel_reads_non_contiguous_and_refuses_wrong_inputs():
    vectors, _ = _gallery(n=8, rows=5, d=40)
    queries = normalize(torch.randn(2, 40, generator=torch.Generator().manual_seed(4)), dim=-1)
    strided = vectors.half()[::2]  # every other video: not contiguous
    scores, best = score_fused(queries, strided, WEIGHTS)
    want, want_best = scan.score_matmul(queries, strided, WEIGHTS)
    torch.testing.assert_close(scores, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(best, want_best)
    with pytest.raises(TypeError, match="reads fp16 index rows, got torch.float32"):
        score_fused(queries, vectors, WEIGHTS)
    with pytest.raises(ValueError, match="queries are 24-d, index rows 40-d"):
        score_fused(queries[:, :24], vectors.half(), WEIGHTS)


@pytest.mark.parametrize("threads", [2, 3, 64])
def test_fused_kernel_split_over_threads_gives_the_same_bits(threads):
    vectors, _ = _gallery(n=200, rows=9, d=40, seed=6)
    stored = vectors.half()
    queries = normalize(torch.randn(2, 40, generator=torch.Generator().manual_seed(7)), dim=-1)
    one = score_fused(queries, stored, WEIGHTS, threads=1)
    split = score_fused(queries, stored, WEIGHTS, threads=threads)  # 200 videos: at most 4 parts of >= 50
    assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])
    assert split[0].shape == (2, 200)


def test_kernel_choice():
    assert pick_kernel("auto", "float16") == "fused"
    assert pick_kernel("auto", "float32") == "matmul"
    assert pick_kernel("matmul", "float16") == "matmul"
    with pytest.raises(KernelUnavailableError, match="reads fp16 indexes; this one is float32"):
        pick_kernel("fused", "float32")


def test_built_kernel_is_cached_between_processes_of_the_same_cpu(fresh_kernel_cache, monkeypatch):
    assert pick_kernel("fused", "float16") == "fused"
    built = list(scan.kernel_cache_dir().glob("scan_fp16-*.so"))
    assert len(built) == 1 and scan.kernel_cache_dir().is_relative_to(fresh_kernel_cache)
    assert "avx" in scan.cpu_signature() or platform.machine() != "x86_64"
    scan._native_library.cache_clear()  # as a new process would start
    monkeypatch.setenv("CC", str(fresh_kernel_cache / "no-such-compiler"))
    assert pick_kernel("fused", "float16") == "fused"  # loaded from the cache: no compiler needed
    scan._native_library.cache_clear()  # the same home directory seen from a CPU with other flags
    monkeypatch.setattr(scan, "cpu_signature", lambda: "flags : fpu sse2")
    with pytest.raises(KernelUnavailableError, match="could not run"):  # must build its own: no compiler
        pick_kernel("fused", "float16")


def test_unwritable_cache_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # mkdir under a file fails
    monkeypatch.setattr(scan.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert scan.kernel_cache_dir() == tmp_path / "tmp" / f"mamfusion-kernels-{os.getuid()}"


def test_missing_compiler_falls_back_or_fails_clearly(fresh_kernel_cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_kernel_cache / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="tasks.scan"):
        assert pick_kernel("auto", "float16") == "matmul"
    assert "no-such-compiler' could not run" in caplog.text
    assert "searching with the matmul kernel" in caplog.text
    with pytest.raises(KernelUnavailableError, match="could not run"):
        pick_kernel("fused", "float16")


def test_a_kernel_that_disagrees_with_matmul_is_not_used(fresh_kernel_cache, monkeypatch, caplog):
    real = scan.score_matmul
    monkeypatch.setattr(scan, "score_matmul", lambda *a, **k: (real(*a, **k)[0] + 1e-3, real(*a, **k)[1]))
    with caplog.at_level(logging.WARNING, logger="tasks.scan"):
        assert pick_kernel("auto", "float16") == "matmul"
    assert "gives wrong scores; delete it to rebuild" in caplog.text


def test_compiler_errors_are_reported(fresh_kernel_cache, monkeypatch):
    fake = fresh_kernel_cache / "fakecc"
    fake.write_text("#!/bin/sh\necho 'scan_fp16.c:1:1: error: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(KernelUnavailableError, match="could not build scan_fp16.c: .*compiler is broken"):
        pick_kernel("fused", "float16")


@x86
def test_avx2_path_matches_and_plain_x86_64_is_refused(fresh_kernel_cache, monkeypatch):
    """The 256-bit path (AVX2 + F16C + FMA) gives the same scores; a CPU with neither path gets matmul."""
    vectors, alive = _gallery(d=72)
    queries = normalize(torch.randn(3, 72, generator=torch.Generator().manual_seed(5)), dim=-1)
    want = scan_topk(queries, [(0, vectors.half())], alive, 10, WEIGHTS, "matmul")
    monkeypatch.setattr(scan, "COMPILE_FLAGS", ("-O3", "-march=haswell", "-shared", "-fPIC"))
    got = scan_topk(queries, [(0, vectors.half())], alive, 10, WEIGHTS, pick_kernel("fused", "float16"))
    assert torch.equal(got.rows, want.rows) and torch.equal(got.clips, want.clips)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-6, atol=1e-6)
    scan._native_library.cache_clear()
    monkeypatch.setattr(scan, "COMPILE_FLAGS", ("-O3", "-march=x86-64", "-shared", "-fPIC"))
    with pytest.raises(KernelUnavailableError, match="no fp16 vector path for this CPU"):
        pick_kernel("fused", "float16")
