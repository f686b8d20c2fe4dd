"""Scoring kernels of the search scan (tasks/scan.py): both kernels and every fused code path against a
brute-force float64 reference, kernel choice, clear fallbacks where the compiled extension is missing, and
that nothing is ever loaded from the old run-time kernel caches."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from torch.nn.functional import normalize

from tasks import scan
from tasks.scan import KernelUnavailableError, pick_kernel, scan_topk, score_fused

WEIGHTS = (0.7, 0.3)
REPO = Path(scan.__file__).resolve().parents[1]
compiled = pytest.mark.skipif(not scan.fused_paths(), reason="tasks._scan_fp16 was not built at install")


def _supported(path: str) -> str:
    if path not in scan.fused_paths():
        pytest.skip(f"this CPU has no {path} path (has: {scan.fused_paths()})")
    return path


@pytest.fixture
def fresh_kernel_state():
    """Forget the loaded extension, passed self-checks and fallback notices, before and after the test."""

    def clear() -> None:
        for cached in (scan._extension, scan._self_check, scan._note_fallback):
            cached.cache_clear()

    clear()
    yield
    clear()


@pytest.fixture
def no_extension(monkeypatch, fresh_kernel_state):
    """An installation where the extension was never built (what a machine without a C compiler gets)."""

    def missing() -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'tasks._scan_fp16'")

    monkeypatch.setattr(scan, "_import_extension", missing)


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
    [
        ("matmul", torch.float16),
        ("matmul", torch.float32),
        pytest.param("fused", torch.float16, marks=compiled),
    ],
)
# 1: the single-query loop; 3, 9: query tiles, partial and full; 70 > FUSED_QUERY_PASS: in two passes
@pytest.mark.parametrize("n_queries", [1, 3, 9, 70])
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


@pytest.mark.parametrize("path", scan.PATHS)
@pytest.mark.parametrize(
    "d", [24, 93, 384]
)  # below one unrolled step; every leftover loop; the paper's width
@pytest.mark.parametrize("n_queries", [1, 6, 13])  # one query; a full tile of 4 and 2 left; three and 1 left
def test_every_fused_path_matches_brute_force_and_matmul(path, d, n_queries, monkeypatch, fresh_kernel_state):
    """Each dispatch variant this CPU can run, forced through the environment as a deployment would."""
    monkeypatch.setenv(scan.PATH_ENV, _supported(path))
    assert scan.fused_path() == path and pick_kernel("fused", "float16") == "fused"
    # 130 videos: split over threads as well; 7 rows: two full tiles of 3 rows and 1 left
    vectors, alive = _gallery(n=130, rows=7, d=d, seed=d)
    stored = vectors.half()
    queries = normalize(torch.randn(n_queries, d, generator=torch.Generator().manual_seed(2)), dim=-1)
    want_scores, want_rows, want_clips = _brute(queries, stored.float(), alive, 12)
    got = scan_topk(
        queries, [(s, stored[s : s + 70]) for s in range(0, 130, 70)], alive, 12, WEIGHTS, "fused"
    )
    assert torch.equal(got.rows, want_rows) and torch.equal(got.clips, want_clips)
    torch.testing.assert_close(got.scores, want_scores, rtol=1e-6, atol=1e-6)
    scores, clips = score_fused(queries, stored, WEIGHTS)
    want, want_clips = scan.score_matmul(queries, stored, WEIGHTS)
    torch.testing.assert_close(scores, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(clips, want_clips)


@pytest.mark.parametrize("path", scan.PATHS)
def test_single_query_streams_cover_every_video_of_any_block_size(path, monkeypatch, fresh_kernel_state):
    """One query scores a block as several interleaved parts plus a remainder: each size from below one part
    per stream to several parts and a remainder must give every video its own score and best clip."""
    monkeypatch.setenv(scan.PATH_ENV, _supported(path))
    vectors, _ = _gallery(n=23, rows=4, d=40, seed=5)
    stored = vectors.half()
    query = normalize(torch.randn(1, 40, generator=torch.Generator().manual_seed(3)), dim=-1)
    for m in range(1, 24):
        scores, clips = score_fused(query, stored[:m], WEIGHTS)
        want, want_clips = scan.score_matmul(query, stored[:m], WEIGHTS)
        torch.testing.assert_close(scores, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(clips, want_clips), m


@pytest.mark.parametrize("path", scan.PATHS)
@pytest.mark.parametrize("d", [40, 93, 384])  # whole 8-lane steps; a tail of 5; the paper's width
def test_a_query_gets_the_same_bits_alone_and_in_any_batch(path, d, monkeypatch, fresh_kernel_state):
    """The server batches whatever queries arrive together: a query's scores must not depend on its
    company, i.e. on the tile shape (1-4 queries, 1-3 rows) or the single-query loop that scored it."""
    monkeypatch.setenv(scan.PATH_ENV, _supported(path))
    vectors, _ = _gallery(n=29, rows=8, d=d, seed=d + 1)
    stored = vectors.half()
    queries = normalize(torch.randn(13, d, generator=torch.Generator().manual_seed(4)), dim=-1)
    alone = [score_fused(queries[i : i + 1], stored, WEIGHTS) for i in range(13)]
    for batch in (queries, queries[2:4], queries[5:12], queries.flip(0)):
        scores, clips = score_fused(batch, stored, WEIGHTS)
        for j, q in enumerate(batch):
            i = int(torch.nonzero((queries == q).all(dim=1))[0])
            assert torch.equal(scores[j], alone[i][0][0]) and torch.equal(clips[j], alone[i][1][0]), (i, j)


@compiled
@pytest.mark.parametrize("path", scan.PATHS)
def test_every_path_widens_every_half_exactly(path):
    """Every non-NaN half (subnormals, signed zeros, infinities) through each path as d=1 rows - the scalar
    conversion the portable path is built on - and every finite one as 16 lanes (the vector conversions)."""
    _supported(path)
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[~halves.isnan()]
    assert len(halves) == 63_490
    for d, values in ((1, halves), (16, halves[halves.isfinite()])):  # 0 * inf in other lanes would be NaN
        lanes = torch.cat([values, values[: (-len(values)) % d]]).view(-1, 1, d)  # padded to whole rows
        rows = torch.cat([lanes, torch.zeros_like(lanes)], dim=1)  # clip = the halves, pooled = 0
        # query j reads lane j: score = 1 * h_j + 0 * (pooled = 0), exact whatever the summation order
        scores, _ = score_fused(torch.eye(d), rows, (1.0, 0.0), path=path)
        assert torch.equal(scores, lanes[:, 0, :].T.float()), (path, d)


@compiled
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


@compiled
def test_extension_checks_its_buffers_and_never_runs_a_path_the_cpu_lacks():
    """The module is called with buffers it measures itself: a wrong size or type is an exception, not a
    read past the end; a path the CPU cannot run is refused before any of its instructions execute."""
    ext = scan._extension()
    rows = torch.zeros(3, 5, 8, dtype=torch.float16).numpy()
    queries, scores, best = (
        torch.zeros(2, 8).numpy(),
        torch.zeros(2, 3).numpy(),
        torch.zeros(2, 3).long().numpy(),
    )
    ext.scan(rows, 5, 8, queries, 1.0, 0.0, scores, best, "portable")
    with pytest.raises(ValueError, match="scores: expected 6 items, got 4"):
        ext.scan(rows, 5, 8, queries, 1.0, 0.0, scores[:, :2].copy(), best, "portable")
    with pytest.raises(TypeError, match="rows: expected items of format 'e'"):
        ext.scan(rows.astype("float32"), 5, 8, queries, 1.0, 0.0, scores, best, "portable")
    with pytest.raises(TypeError, match="best: expected items of format 'ql'"):
        ext.scan(rows, 5, 8, queries, 1.0, 0.0, scores, best.astype("int32"), "portable")
    with pytest.raises(ValueError, match="rows: 119 items are not a whole number of 40"):
        ext.scan(rows.reshape(-1)[1:], 5, 8, queries, 1.0, 0.0, scores, best, "portable")
    readonly = scores.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):  # numpy refuses the writable buffer the output needs
        ext.scan(rows, 5, 8, queries, 1.0, 0.0, readonly, best, "portable")
    with pytest.raises(ValueError, match="path 'sse9' is unknown"):
        ext.scan(rows, 5, 8, queries, 1.0, 0.0, scores, best, "sse9")
    with pytest.raises(
        KernelUnavailableError, match=r"path 'sse9' is not available on this CPU \(here: .*portable\)"
    ):
        score_fused(torch.zeros(1, 8), torch.zeros(3, 5, 8, dtype=torch.float16), WEIGHTS, path="sse9")
    for lacking in set(scan.PATHS) - set(scan.fused_paths()):
        with pytest.raises(ValueError, match=f"path '{lacking}' is not supported by this CPU"):
            ext.scan(rows, 5, 8, queries, 1.0, 0.0, scores, best, lacking)


@compiled
@pytest.mark.parametrize("threads", [2, 3, 64])
def test_scan_on_several_threads_gives_the_same_bits_as_one(threads, monkeypatch):
    """Threads take blocks as they free up, so which thread merged which blocks varies from run to run; the
    top-k must not, even among exactly tied scores (the same video indexed twice) and tombstones."""
    vectors, alive = _gallery(n=200, rows=10, d=40, seed=6)
    vectors[100:150] = vectors[:50]  # 50 exact ties, each pair in a different block
    stored = vectors.half()
    blocks = [(s, stored[s : s + 7]) for s in range(0, 200, 7)]
    seen = []
    real = scan.score_fused
    monkeypatch.setattr(
        scan, "score_fused", lambda *a, **k: seen.append(threading.current_thread().name) or real(*a, **k)
    )
    for n_queries in (1, 7):
        queries = normalize(torch.randn(n_queries, 40, generator=torch.Generator().manual_seed(7)), dim=-1)
        queries[0] = vectors[10, 0].float()  # its best video (and its twin) tie exactly
        one = scan_topk(queries, blocks, alive, 20, WEIGHTS, "fused", threads=1)
        seen.clear()
        for _ in range(5):
            split = scan_topk(queries, blocks, alive, 20, WEIGHTS, "fused", threads=threads)
            assert all(
                torch.equal(a, b) for a, b in zip(vars(one).values(), vars(split).values(), strict=True)
            )
        assert seen and all(name.startswith("mamfusion-scan") for name in seen)  # the pool did the work
        assert one.rows[0, :2].tolist() == [10, 110]  # the tie, lower row first
        assert one.scores[0, 0] == one.scores[0, 1]
    want_scores, _, _ = _brute(queries, stored.float(), alive, 200)
    torch.testing.assert_close(split.scores, want_scores[:, :20], rtol=1e-6, atol=1e-6)  # the true top 20


@compiled
def test_kernel_choice():
    assert pick_kernel("auto", "float16") == "fused"
    assert pick_kernel("auto", "float32") == "matmul"
    assert pick_kernel("matmul", "float16") == "matmul"
    assert scan.fused_path() == scan.fused_paths()[0]
    assert scan.fused_paths()[-1] == "portable"  # every machine with the extension has a compiled path
    with pytest.raises(KernelUnavailableError, match="reads fp16 indexes; this one is float32"):
        pick_kernel("fused", "float32")


@compiled
def test_forcing_a_path_this_cpu_lacks_fails_clearly(monkeypatch, fresh_kernel_state, caplog):
    lacking = next((p for p in scan.PATHS if p not in scan.fused_paths()), None)
    for forced, why in [("sse9", "unknown"), *([(lacking, "not supported by this CPU")] if lacking else [])]:
        monkeypatch.setenv(scan.PATH_ENV, forced)
        with pytest.raises(KernelUnavailableError, match=f"{scan.PATH_ENV}={forced}: .* is {why}"):
            pick_kernel("fused", "float16")
        with caplog.at_level(logging.WARNING, logger="tasks.scan"):
            assert pick_kernel("auto", "float16") == "matmul"
        assert f"{forced}: that fused kernel path is {why}" in caplog.text


def test_missing_extension_falls_back_once_or_fails_clearly(no_extension, caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.scan"):
        assert pick_kernel("auto", "float16") == "matmul"
        assert pick_kernel("auto", "float16") == "matmul"  # e.g. a second index: no second notice
    notices = [r.getMessage() for r in caplog.records if r.name == "tasks.scan"]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "not part of this installation" in notices[0] and "searching with the matmul kernel" in notices[0]
    assert scan.fused_paths() == ()
    with pytest.raises(KernelUnavailableError, match=r"reinstall mamfusion where a C compiler works") as err:
        pick_kernel("fused", "float16")
    assert isinstance(err.value, scan.MamFusionError)
    vectors, alive = _gallery()
    with pytest.raises(KernelUnavailableError, match="tasks._scan_fp16"):
        scan_topk(vectors[:1, 0], [(0, vectors.half())], alive, 3, WEIGHTS, "fused")
    matmul = scan_topk(vectors[:1, 0], [(0, vectors.half())], alive, 3, WEIGHTS, "matmul")
    assert matmul.rows.shape == (1, 3)


@compiled
def test_the_extension_is_taken_from_the_package_directory_only(monkeypatch, fresh_kernel_state, tmp_path):
    """With no module file in the package's directory the kernel is unavailable, even though the import system
    could still find `tasks._scan_fp16` (here: the real one, through the editable install's finder)."""
    assert importlib.util.find_spec(scan.EXTENSION) is not None
    assert Path(scan._extension().__file__).parent == scan.PACKAGE_DIR
    scan._extension.cache_clear()
    monkeypatch.setattr(scan, "PACKAGE_DIR", tmp_path)
    with pytest.raises(KernelUnavailableError, match=f"no tasks._scan_fp16 module file in {tmp_path}"):
        pick_kernel("fused", "float16")


@compiled
def test_a_kernel_that_disagrees_with_matmul_is_not_used(monkeypatch, fresh_kernel_state, caplog):
    real = scan.score_matmul
    monkeypatch.setattr(scan, "score_matmul", lambda *a, **k: (real(*a, **k)[0] + 1e-3, real(*a, **k)[1]))
    with caplog.at_level(logging.WARNING, logger="tasks.scan"):
        assert pick_kernel("auto", "float16") == "matmul"
    assert f"fused kernel's {scan.fused_path()} path gives wrong scores on this machine" in caplog.text
    with pytest.raises(KernelUnavailableError, match="gives wrong scores"):
        score_fused(torch.ones(1, 8), torch.ones(2, 3, 8, dtype=torch.float16), WEIGHTS)


PLANTED_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("planted library ran\n", f); fclose(f); }
}
void scan_fp16(void) {}
"""

FUSED_SEARCH = r"""
import json, sys, torch
from torch.nn.functional import normalize
from tasks import scan
gen = torch.Generator().manual_seed(0)
vectors = normalize(torch.randn(40, 5, 24, generator=gen), dim=-1).half()
alive = torch.ones(40, dtype=torch.bool)
kernel = scan.pick_kernel("fused", "float16")
hits = {p: scan.score_fused(vectors[:2, 0].float(), vectors, (0.7, 0.3), path=p)[0].tolist()
        for p in scan.fused_paths()}
top = scan.scan_topk(vectors[:1, 0].float(), [(0, vectors)], alive, 3, (0.7, 0.3), kernel)
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if line.split()[-1].startswith("/")})
print(json.dumps({"kernel": kernel, "rows": top.rows.tolist(), "paths": list(hits),
                  "extension": scan._extension().__file__, "maps": maps}))
"""


@compiled
@pytest.mark.skipif(
    not shutil.which(os.environ.get("CC", "cc")), reason="no C compiler to build the planted .so"
)
def test_libraries_planted_in_the_old_kernel_caches_are_never_loaded(tmp_path):
    """The old code loaded any `scan_fp16-<key>.so` from ~/.cache/mamfusion/kernels or
    $TMPDIR/mamfusion-kernels-<uid> - a planted file's constructor ran inside `mamfusion search`."""
    marker = tmp_path / "marker"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_SOURCE % marker)
    planted = tmp_path / "planted.so"
    subprocess.run(
        [os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", str(planted), str(source)], check=True
    )
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    names = ["scan_fp16-0123456789abcdef.so", "scan_fp16-" + "f" * 16 + ".so"]
    names += ["_scan_fp16" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    caches = [home / ".cache" / "mamfusion" / "kernels", tmp / f"mamfusion-kernels-{os.getuid()}"]
    for cache in caches:
        cache.mkdir(parents=True)
        for name in names:
            shutil.copy(planted, cache / name)
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}

    # the marker works: loading the planted file runs its constructor
    load = f"import ctypes; ctypes.CDLL({str(caches[0] / names[0])!r})"
    subprocess.run([sys.executable, "-c", load], env=env, check=True, timeout=60)
    assert marker.read_text() == "planted library ran\n"
    marker.unlink()

    out = subprocess.run(
        [sys.executable, "-c", FUSED_SEARCH],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert not marker.exists(), "a planted library was loaded"
    assert (
        result["kernel"] == "fused"
        and result["rows"][0][0] == 0
        and result["paths"] == list(scan.fused_paths())
    )
    assert Path(result["extension"]).parent == scan.PACKAGE_DIR
    assert not [m for m in result["maps"] if m.startswith((str(home), str(tmp)))]
    assert sorted(p.name for c in caches for p in c.iterdir()) == sorted(names * 2)  # nothing written there


def _copy_project(dest: Path) -> Path:
    """What building tasks._scan_fp16 needs, without any built artefact."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd")
    for package in ("tasks", "storage"):
        shutil.copytree(REPO / package, dest / package, ignore=skip)
    return dest


PICK_KERNELS = r"""
from tasks import scan
assert scan.PACKAGE_DIR.parent.samefile("."), scan.PACKAGE_DIR
print(scan.pick_kernel("auto", "float16"))
try:
    scan.pick_kernel("fused", "float16")
except scan.KernelUnavailableError as e:
    print("fused:", e)
"""


@pytest.mark.slow
def test_installing_without_a_compiler_succeeds_and_search_falls_back(tmp_path):
    """The PEP 660 hook that `pip install -e .` runs, with CC=false, in a copy of the project: the install
    succeeds without the extension and search takes matmul; with the compiler the hook builds it in place."""
    project = _copy_project(tmp_path / "project")
    hook = "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))"
    build = [sys.executable, "-c", hook]
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CFLAGS", "LDSHARED")}
    pick = [sys.executable, "-c", PICK_KERNELS]

    no_cc = subprocess.run(
        [*build, str(tmp_path / "wheel-no-cc")], cwd=project, env=env | {"CC": "false"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert no_cc.returncode == 0, no_cc.stderr
    assert no_cc.stdout.strip().splitlines()[-1].endswith(".whl")
    assert "building 'tasks._scan_fp16' extension" in no_cc.stdout + no_cc.stderr  # it was tried
    assert not list((project / "tasks").glob("_scan_fp16*.so"))
    fallback = subprocess.run(pick, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stdout.splitlines()[0] == "matmul"
    assert "fused: the fused search kernel (extension module tasks._scan_fp16) is not part" in fallback.stdout
    assert "C compiler" in fallback.stdout and "searching with the matmul kernel" in fallback.stderr

    if not shutil.which("cc"):
        return
    with_cc = subprocess.run(
        [*build, str(tmp_path / "wheel")], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert with_cc.returncode == 0, with_cc.stderr
    assert len(list((project / "tasks").glob("_scan_fp16*.so"))) == 1  # built in place, next to scan.py
    fused = subprocess.run(pick, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert fused.returncode == 0 and fused.stdout.splitlines() == ["fused"], fused.stdout + fused.stderr
