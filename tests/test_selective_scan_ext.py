"""The compiled selective scan (models._selective_scan): every code path this CPU runs against the float64
sequential reference, its layouts, thread split and arguments, and the fallback where it is not built.

Gradients are compared with the float64 reference's at float32 precision (the kernel has no float64 path, so
no gradcheck); relative error is ||got - want|| / ||want|| over the whole tensor.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import types

import pytest
import torch
import torch.nn.functional as F
from test_mamba import NAMES, rel_err, run, scan_inputs

import models.selective_scan as scan_module
from models.mamba import Mamba
from models.selective_scan import (
    CompiledScanUnavailableError,
    compiled_paths,
    selective_scan,
    sequential_selective_scan,
)

pytestmark = pytest.mark.skipif(not compiled_paths(), reason="compiled selective scan not built here")
PATHS = compiled_paths() or ("none",)
TOL = 3e-6  # float32 precision: the chunked scan's own errors are 1-3e-7 on these cases


def compiled(path: str, chunk: int | None = None):
    """The compiled scan on one path (and chunk), as a scan function."""

    def scan(**kwargs: torch.Tensor) -> torch.Tensor:
        return scan_module._compiled_scan(**kwargs, path=path, chunk=chunk)

    return scan


def as32(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().requires_grad_() for k, v in inputs.items()}


def max_err(y: torch.Tensor, g: dict[str, torch.Tensor], y_ref: torch.Tensor, g_ref: dict[str, torch.Tensor]):
    """Largest relative error of the output and each gradient, and which one it is."""
    errs = {"y": rel_err(y.double(), y_ref)} | {k: rel_err(g[k].double(), g_ref[k]) for k in g}
    worst = max(errs, key=errs.__getitem__)
    return errs[worst], worst


# (L, d_inner, d_state): d_state 16 takes the unrolled state loop, others the generic one; d_inner not a
# multiple of 16 leaves a partial channel group (and on 8- or 4-lane paths groups that are all padding).
CASES = [(1, 16, 16), (7, 5, 4), (32, 32, 16), (32, 21, 5), (512, 16, 16), (512, 6, 3), (1024, 16, 16)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("length", "d", "n"), CASES, ids=[f"L{c[0]}-d{c[1]}-n{c[2]}" for c in CASES])
def test_every_path_matches_the_float64_reference(path: str, length: int, d: int, n: int) -> None:
    inputs = scan_inputs(3, d, n, length, torch.float64, seed=length + d)
    gy = torch.randn(3, d, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref, g_ref = run(sequential_selective_scan, inputs, gy)
    y, g = run(compiled(path), as32(inputs), gy.float())
    assert y.dtype == torch.float32
    err, worst = max_err(y, g, y_ref, g_ref)
    assert err < TOL, worst
    assert all(g[k].abs().sum() > 0 for k in NAMES if k != "A" or length > 1)  # at L = 1, A never acts


@pytest.mark.parametrize("chunk", [1, 3, 16, 37, 100])
def test_chunk_boundaries_do_not_show(chunk: int) -> None:
    """Backward chunks of any size, the last one partial or the whole sequence, give the same gradients."""
    inputs = scan_inputs(2, 24, 16, 37, torch.float64, seed=5)
    gy = torch.randn(2, 24, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y_ref, g_ref = run(sequential_selective_scan, inputs, gy)
    y, g = run(compiled(PATHS[0], chunk), as32(inputs), gy.float())
    err, worst = max_err(y, g, y_ref, g_ref)
    assert err < TOL, worst


def test_paths_agree_with_each_other() -> None:
    inputs = as32(scan_inputs(2, 40, 16, 300, torch.float64, seed=9))
    results = [run(compiled(path), inputs) for path in PATHS]
    for y, g in results[1:]:
        assert rel_err(y, results[0][0]) < 1e-6
        for k in NAMES:
            assert rel_err(g[k], results[0][1][k]) < 1e-6, k


def layouts(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The same values in three memory layouts: (b, ·, L) contiguous, (b, L, ·) seen transposed (Mamba's),
    and strided slices of larger buffers."""
    out = [{k: v.detach().clone() for k, v in inputs.items()}]
    out.append(
        {
            k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v.detach())
            for k, v in inputs.items()
        }
    )
    sliced = {}
    for k, v in inputs.items():
        if v.dim() == 3:
            big = torch.zeros(v.shape[0], v.shape[1] + 3, 2 * v.shape[2], dtype=v.dtype)
            big[:, 2:-1, ::2] = v.detach()
            sliced[k] = big[:, 2:-1, ::2]
        else:
            sliced[k] = v.detach()
    out.append(sliced)
    return [{k: v.requires_grad_() for k, v in layout.items()} for layout in out]


@pytest.mark.parametrize("path", PATHS)
def test_every_memory_layout_gives_identical_results(path: str) -> None:
    """Tiles are gathered and scattered whatever the strides: bit-identical outputs and gradients."""
    base = scan_inputs(2, 20, 16, 45, torch.float32, seed=3)
    gy = torch.randn(2, 20, 45, generator=torch.Generator().manual_seed(4))
    results = [run(compiled(path), layout, gy) for layout in layouts(base)]
    for y, g in results[1:]:
        assert torch.equal(y, results[0][0])
        for k in NAMES:
            assert torch.equal(g[k], results[0][1][k]), k


def test_gradients_come_back_in_the_inputs_layout() -> None:
    """Gradients for (b, L, d)-memory inputs are (b, L, d) memory too, so autograd never re-lays them out."""
    inputs = layouts(scan_inputs(2, 16, 16, 30, torch.float32))[1]
    y, g = run(compiled(PATHS[0]), inputs)
    assert y.stride() == inputs["u"].stride()
    for k in ("u", "delta", "z"):
        assert g[k].stride() == inputs[k].stride(), k


def test_optional_arguments_and_softplus_off() -> None:
    inputs = scan_inputs(2, 19, 4, 60, torch.float64, seed=8)
    raw = {k: inputs[k] for k in ("u", "A", "B", "C")}
    raw["delta"] = F.softplus(inputs["delta"]).detach().requires_grad_()  # positive steps, given directly
    y_ref = sequential_selective_scan(**raw)
    y = selective_scan(**as32(raw), impl="compiled")
    assert rel_err(y.double(), y_ref) < TOL
    g_ref = torch.autograd.grad(y_ref.sum(), list(raw.values()))
    x32 = as32(raw)
    g = torch.autograd.grad(selective_scan(**x32, impl="compiled").sum(), list(x32.values()))
    for name, a, b in zip(raw, g, g_ref, strict=True):
        assert rel_err(a.double(), b) < TOL, name


def single_channel_inputs(
    A: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> dict[str, torch.Tensor]:
    """(1, d, L) inputs with d_state 1, from per-channel (d, L) u and delta and (L,) B, C."""
    return {"u": u[None], "delta": delta[None], "A": A[:, None], "B": B[None, None], "C": C[None, None]}


def test_decay_is_exp_to_float32_precision_over_its_whole_range() -> None:
    """d_state 1, L = 2, delta = (1e-30, 1), u = (1e30, 0), B = 1, C = (0, 1): step 1 leaves h = 1 under a
    decay of 1, so y_2 = exp(A) (times float32's 1e-30 * 1e30): the kernel's exp on its own, from underflow
    through 1 to overflow (float32's exp overflows past 88.72)."""
    A = torch.cat([torch.linspace(-120.0, 88.0, 4000), torch.tensor([-1e-6, 0.0, 1e-6, 88.8, 100.0])])
    d = len(A)
    delta, u = torch.tensor([1e-30, 1.0]), torch.tensor([1e30, 0.0])
    inputs = single_channel_inputs(
        A, delta.repeat(d, 1), u.repeat(d, 1), torch.ones(2), torch.tensor([0.0, 1.0])
    )
    want = torch.exp(A.double()) * (delta[0].double() * u[0].double())
    finite, tiny = A < 88.7, want < 1e-37  # float32 normals end at 1.2e-38; below, results are flushed
    for path in PATHS:
        got = scan_module._compiled_scan(**inputs, path=path)[0, :, 1].double()
        normal = finite & ~tiny
        assert (got[normal] / want[normal] - 1).abs().max() < 2.5e-7, path
        assert (got[tiny] <= 1e-37).all() and (got[tiny] >= 0).all(), path
        assert torch.isinf(got[~finite]).all(), path


def test_softplus_keeps_relative_precision_in_both_tails() -> None:
    """y_1 = softplus(delta) for u = B = C = 1 and L = 1; its gradient wrt delta is sigmoid(delta)."""
    delta = torch.linspace(-40.0, 40.0, 3001).double()  # float32 values: exp(-40 + ulp) differs by 2e-6
    d = len(delta)
    for path in PATHS:
        inputs = single_channel_inputs(
            -torch.ones(d), delta[:, None], torch.ones(d, 1), torch.ones(1), torch.ones(1)
        )
        inputs = {k: v.float().requires_grad_() for k, v in inputs.items()}
        y = scan_module._compiled_scan(**inputs, delta_softplus=True, path=path)
        (g,) = torch.autograd.grad(y.sum(), [inputs["delta"]])
        want = F.softplus(delta)
        assert ((y[0, :, 0].double() - want) / want).abs().max() < 5e-7, path
        sig = torch.sigmoid(delta)
        assert ((g[0, :, 0].double() - sig) / sig).abs().max() < 5e-7, path


def test_gate_and_long_decay_chains_near_one() -> None:
    """Decays within 1e-4 of 1 compound over 1024 steps; the silu gate covers large |z|."""
    inputs = scan_inputs(1, 16, 16, 1024, torch.float64, seed=11)
    inputs["A"] = (-1e-4 * torch.rand(16, 16, dtype=torch.float64)).requires_grad_()
    inputs["z"] = (30 * torch.randn(1, 16, 1024, dtype=torch.float64)).requires_grad_()
    y_ref, g_ref = run(sequential_selective_scan, inputs)
    y, g = run(compiled(PATHS[0]), as32(inputs))
    err, worst = max_err(y, g, y_ref, g_ref)
    assert err < 1e-5, worst


@pytest.mark.parametrize(("b", "d", "threads"), [(5, 64, 3), (1, 64, 4), (2, 40, 2)])
def test_thread_split_gives_the_single_thread_result(
    monkeypatch: pytest.MonkeyPatch, b: int, d: int, threads: int
) -> None:
    """Split over batch rows, and over channel groups when rows are fewer than threads (their dB, dC and
    dA, dD partial sums then added up): the same output, gradients equal to rounding."""
    inputs = as32(scan_inputs(b, d, 16, 50, torch.float64, seed=b))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = run(compiled(PATHS[0]), inputs)
        monkeypatch.setattr(scan_module, "MIN_STEPS_PER_THREAD", 1)
        torch.set_num_threads(threads)
        grid = scan_module._grid(b, -(-d // 16), 50)
        y2, g2 = run(compiled(PATHS[0]), inputs)
    finally:
        torch.set_num_threads(previous)
    assert grid[0] * grid[1] > 1
    assert torch.equal(y1, y2)
    for k in NAMES:
        assert rel_err(g2[k], g1[k]) < 1e-6, k


def test_no_grad_forward_equals_the_training_forward() -> None:
    """Without autograd the kernel keeps no chunk states; the output is bit-identical."""
    inputs = as32(scan_inputs(2, 32, 16, 70, torch.float64))
    with torch.no_grad():
        y0 = selective_scan(**inputs, delta_softplus=True, impl="compiled")
    with torch.inference_mode():
        y1 = selective_scan(**inputs, delta_softplus=True, impl="compiled")
    y2 = selective_scan(**inputs, delta_softplus=True, impl="compiled")
    assert torch.equal(y0, y2) and torch.equal(y1, y2)


def test_narrow_inputs_compute_in_fp32_and_keep_their_dtype() -> None:
    base = as32(scan_inputs(2, 16, 16, 40, torch.float64))
    want = selective_scan(**{k: v.detach() for k, v in base.items()}, delta_softplus=True, impl="torch")
    for dtype in (torch.bfloat16, torch.float16):
        narrow = {k: v.detach().to(dtype) for k, v in base.items()}
        y = selective_scan(**narrow, delta_softplus=True, impl="compiled")
        wide = {k: v.float() for k, v in narrow.items()}
        assert y.dtype == dtype
        assert torch.equal(y, selective_scan(**wide, delta_softplus=True, impl="compiled").to(dtype))
        assert rel_err(y.float(), want) < 3e-2


def test_auto_takes_the_kernel_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: fp32 CPU -> compiled; fp64 -> chunked, bit for bit; compiled refuses fp64 and big d_state."""
    calls: list[int] = []
    original = scan_module._compiled_scan
    monkeypatch.setattr(scan_module, "_compiled_scan", lambda *a, **k: calls.append(1) or original(*a, **k))
    x64 = {k: v.detach() for k, v in scan_inputs(2, 8, 4, 20, torch.float64).items()}
    x32 = {k: v.float() for k, v in x64.items()}
    selective_scan(**x32, delta_softplus=True)
    assert calls == [1]
    assert torch.equal(selective_scan(**x64), selective_scan(**x64, impl="torch"))
    assert calls == [1]
    with pytest.raises(CompiledScanUnavailableError, match="fp32"):
        selective_scan(**x64, impl="compiled")
    big = scan_inputs(1, 8, 65, 5, torch.float32)
    with pytest.raises(CompiledScanUnavailableError, match="d_state up to 64"):
        selective_scan(**big, impl="compiled")


def test_path_can_be_forced_and_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(scan_module.PATH_ENV, "portable")
    assert scan_module.compiled_path() == "portable"
    monkeypatch.setenv(scan_module.PATH_ENV, "sse9")
    with pytest.raises(CompiledScanUnavailableError, match="unknown"):
        scan_module.compiled_path()
    if "avx512" not in PATHS:
        monkeypatch.setenv(scan_module.PATH_ENV, "avx512")
        with pytest.raises(CompiledScanUnavailableError, match="not supported by this CPU"):
            scan_module.compiled_path()


@pytest.fixture
def fresh_caches():
    """Forget the cached extension, self-checks and fallback notices before and after a test."""
    caches = (scan_module._extension, scan_module._self_check, scan_module._note_fallback)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_missing_extension_falls_back_with_one_notice(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture, fresh_caches
) -> None:
    """As after an install without a C compiler: no module file in the package directory."""
    monkeypatch.setattr(scan_module, "PACKAGE_DIR", tmp_path)
    inputs = {k: v.detach() for k, v in scan_inputs(2, 8, 4, 20, torch.float32).items()}
    with caplog.at_level(logging.WARNING, logger=scan_module.__name__):
        y1 = selective_scan(**inputs, delta_softplus=True)
        y2 = selective_scan(**inputs, delta_softplus=True)
    assert torch.equal(y1, selective_scan(**inputs, delta_softplus=True, impl="torch")) and torch.equal(
        y1, y2
    )
    notices = [r for r in caplog.records if "using the chunked PyTorch scan" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert compiled_paths() == ()
    with pytest.raises(CompiledScanUnavailableError, match="not part of this installation"):
        selective_scan(**inputs, impl="compiled")
    with pytest.raises(CompiledScanUnavailableError, match="not part of this installation"):
        Mamba(8, impl="compiled")


def test_a_wrong_kernel_is_caught_by_the_self_check(monkeypatch: pytest.MonkeyPatch, fresh_caches) -> None:
    """A kernel whose forward leaves y at zero (miscompiled, say) fails its self-check; auto falls back."""
    real = scan_module._import_extension()

    def zero_forward(tensors, *args):
        real.forward(tensors, *args)
        tensors[8][...] = 0

    fake = types.SimpleNamespace(
        paths=real.paths,
        forward=zero_forward,
        backward=real.backward,
        LANES=real.LANES,
        MAX_STATE=real.MAX_STATE,
    )
    monkeypatch.setattr(scan_module, "_import_extension", lambda: fake)
    with pytest.raises(CompiledScanUnavailableError, match="is wrong here"):
        scan_module._kernel()
    inputs = {k: v.detach() for k, v in scan_inputs(2, 8, 4, 20, torch.float32).items()}
    y = selective_scan(**inputs, delta_softplus=True)
    assert torch.equal(y, selective_scan(**inputs, delta_softplus=True, impl="torch"))


def test_the_module_checks_its_arguments() -> None:
    ext = scan_module._import_extension()
    b, length, d, n = 2, 5, 16, 4
    f = torch.float32
    u = torch.randn(b, d, length)
    tensors = [
        u,
        u.clone(),
        None,
        torch.randn(b, n, length),
        torch.randn(b, n, length),
        torch.randn(n, d),
        torch.randn(d),
        torch.zeros(d),
        torch.empty(b, d, length),
        None,
    ]

    def call(ts, dims=(b, length, d, n), items=(0, b, 0, 1), path=PATHS[0]):
        ext.forward(tuple(None if t is None else t.numpy() for t in ts), dims, items, 4, True, path)

    call(tensors)  # the valid call
    with pytest.raises(ValueError, match="u: expected shape"):
        call([torch.randn(b, d, length + 1), *tensors[1:]])
    with pytest.raises(TypeError, match="float32"):
        call([u.double(), *tensors[1:]])
    with pytest.raises(ValueError, match="A: expected 64 floats"):
        call([*tensors[:5], torch.randn(n, d + 1), *tensors[6:]])
    with pytest.raises(ValueError, match="item range"):
        call(tensors, items=(0, b + 1, 0, 1))
    with pytest.raises(ValueError, match="unknown selective scan path"):
        call(tensors, path="sse9")
    with pytest.raises(
        ValueError, match="y: unsupported strides"
    ):  # threads must never write one address twice
        call([*tensors[:8], torch.empty(b, d, 1, dtype=f).expand(b, d, length), None])
    with pytest.raises(TypeError, match="delta is required"):
        call([u, None, *tensors[2:]])
    with pytest.raises(ValueError, match="d_state must be at most 64"):
        call(tensors, dims=(b, length, d, 65))


def test_block_under_autocast_and_odd_widths_use_the_kernel() -> None:
    """Mamba with d_inner 20 (a partial channel group) under bf16 autocast: fp32 scan, finite grads."""
    torch.manual_seed(0)
    m, ref = Mamba(10, impl="compiled"), Mamba(10, impl="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 33, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref(x)) < 3e-2
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in m.parameters())
    assert math.isfinite(float(y.detach().float().sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_scans_with_threads_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked worker (multiprocessing, DataLoader) scans on threads of its own, not the parent's pool."""
    monkeypatch.setattr(scan_module, "MIN_STEPS_PER_THREAD", 1)
    inputs = {k: v.detach() for k, v in scan_inputs(4, 32, 16, 40, torch.float32).items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = selective_scan(**inputs, delta_softplus=True, impl="compiled")  # the parent's pool now exists
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_scan_in_child, (inputs,)).get(timeout=60)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, want)


def _scan_in_child(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    torch.set_num_threads(2)
    return selective_scan(**inputs, delta_softplus=True, impl="compiled")
