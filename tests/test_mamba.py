"""The pure-PyTorch Mamba block and its selective scans (chunked, and compiled where built), against
independent references. tests/test_selective_scan_ext.py has the compiled kernel's own cases.

Relative error is ||got - want|| / ||want|| over the whole tensor. Long-L cases use a small d_inner so the
sequential references stay fast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models.mamba as mamba_module
import models.selective_scan as scan_module
from models.mamba import Mamba, selective_scan, sequential_selective_scan
from models.selective_scan import CompiledScanUnavailableError, compiled_paths

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
NOT_BUILT = pytest.mark.skipif(not compiled_paths(), reason="compiled selective scan not built here")
# the CPU scans: `torch` (chunked) always, `compiled` where the install built it (fp32 compute)
CPU_IMPLS = ["torch", pytest.param("compiled", marks=NOT_BUILT)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def scan_inputs(
    b: int, d: int, n: int, length: int, dtype: torch.dtype, seed: int = 0, bias: float = -1.0
) -> dict[str, torch.Tensor]:
    """Inputs shaped like Mamba's: raw delta + bias through softplus, A = -exp(A_log), A_log ~ log(1..n)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    A_log = torch.log(torch.arange(1, n + 1, dtype=torch.float64)).repeat(d, 1) + 0.1 * rnd(d, n)
    values = {
        "u": rnd(b, d, length),
        "delta": 0.5 * rnd(b, d, length),
        "A": -torch.exp(A_log),
        "B": rnd(b, n, length),
        "C": rnd(b, n, length),
        "D": rnd(d),
        "z": rnd(b, d, length),
        "delta_bias": bias + 0.3 * rnd(d),
    }
    return {k: v.to(dtype).requires_grad_() for k, v in values.items()}


def run(fn, inputs: dict[str, torch.Tensor], gy: torch.Tensor | None = None, **kw):
    """Output and gradients w.r.t. every input for the loss sum(y * gy)."""
    y = fn(**inputs, delta_softplus=True, **kw)
    gy = torch.ones_like(y) if gy is None else gy
    grads = torch.autograd.grad(y, list(inputs.values()), gy)
    return y.detach(), dict(zip(inputs, grads, strict=True))


def hand_scan(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar-by-scalar loop with `math`, written from the recurrence; independent of models/."""
    u, delta, A, B, C, D, z, bias = (inputs[k].detach().double().tolist() for k in NAMES)
    b, d, length, n = len(u), len(u[0]), len(u[0][0]), len(A[0])
    out = torch.zeros(b, d, length, dtype=torch.float64)
    for i in range(b):
        for c in range(d):
            h = [0.0] * n
            for t in range(length):
                x = delta[i][c][t] + bias[c]
                dt = x if x > 20 else math.log1p(math.exp(x))
                h = [math.exp(dt * A[c][s]) * h[s] + dt * B[i][s][t] * u[i][c][t] for s in range(n)]
                y = sum(C[i][s][t] * h[s] for s in range(n)) + D[c] * u[i][c][t]
                out[i, c, t] = y * z[i][c][t] / (1 + math.exp(-z[i][c][t]))
    return out


@pytest.mark.parametrize("length", [1, 3, 7])
def test_both_scans_match_a_hand_written_loop(length: int) -> None:
    inputs = scan_inputs(2, 3, 4, length, torch.float64)
    want = hand_scan(inputs)
    for fn in (sequential_selective_scan, selective_scan):
        got = fn(**inputs, delta_softplus=True).detach()
        assert rel_err(got, want) < 1e-12, fn.__name__
    chunked = selective_scan(**inputs, delta_softplus=True, chunk_size=2, impl="torch").detach()
    assert rel_err(chunked, want) < 1e-12
    if compiled_paths():  # fp32 compute
        inputs32 = {k: v.detach().float() for k, v in inputs.items()}
        assert rel_err(selective_scan(**inputs32, delta_softplus=True, impl="compiled").double(), want) < 1e-6


CASES = [(1, 4), (7, 3), (32, 32), (32, 5), (512, 32), (512, 100), (1024, 32)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("length", "chunk"), CASES, ids=[f"L{n}-K{k}" for n, k in CASES])
def test_chunked_scan_equals_sequential_forward_and_gradients(
    length: int, chunk: int, dtype: torch.dtype
) -> None:
    d = 16 if length <= 32 else 6
    inputs = scan_inputs(3, d, 4, length, dtype, seed=length)
    gy = torch.randn(3, d, length, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y_ref, g_ref = run(sequential_selective_scan, inputs, gy)
    y, g = run(selective_scan, inputs, gy, chunk_size=chunk, impl="torch")
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    for name in NAMES:
        assert rel_err(g[name], g_ref[name]) < TOL[dtype], name


def test_backward_row_groups_and_optional_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several (uneven) row groups in the backward, and D / z / delta_bias left out, softplus off."""
    monkeypatch.setattr(scan_module, "_GROUP_ELEMENTS", 3 * 4 * 5)  # 3 rows per group, 2*7 = 14 rows
    inputs = scan_inputs(2, 5, 4, 50, torch.float64)
    inputs = {k: inputs[k] for k in ("u", "A", "B", "C")} | {"delta": F.softplus(inputs["delta"]).detach()}
    inputs["delta"].requires_grad_()
    y_ref = sequential_selective_scan(**inputs)
    y = selective_scan(**inputs, chunk_size=8, impl="torch")
    assert rel_err(y, y_ref) < 1e-12
    g_ref = torch.autograd.grad(y_ref.sum(), list(inputs.values()))
    g = torch.autograd.grad(y.sum(), list(inputs.values()))
    for name, a, b in zip(inputs, g, g_ref, strict=True):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_strong_decays_stay_finite_and_exact(impl: str) -> None:
    """delta * A down to about -300 per step: exp underflows to 0 (fine) but nothing overflows."""
    inputs = scan_inputs(2, 8, 16, 200, torch.float32, bias=20.0)
    y_ref, g_ref = run(sequential_selective_scan, inputs)
    y, g = run(selective_scan, inputs, chunk_size=16, impl=impl)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g.values())
    assert rel_err(y, y_ref) < 1e-4
    for name in NAMES:
        assert rel_err(g[name], g_ref[name]) < 1e-4, name


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(("length", "valid"), [(32, 19), (512, 300), (1024, 1000)])
def test_end_padding_never_changes_valid_positions(length: int, valid: int, impl: str) -> None:
    full = scan_inputs(2, 6, 4, length, torch.float32, seed=3)
    alone = {
        k: (v[:1, ..., :valid] if v.dim() == 3 else v).detach().clone().requires_grad_()
        for k, v in full.items()
    }
    padded = {k: v.detach().clone() for k, v in full.items()}
    for k in ("u", "delta", "B", "C", "z"):  # sequence 1 = sequence 0's prefix, zero-padded at the end
        padded[k][1, ..., :valid] = padded[k][0, ..., :valid]
        padded[k][1, ..., valid:] = 0
    padded = {k: v.requires_grad_() for k, v in padded.items()}
    y_alone, g_alone = run(selective_scan, alone, impl=impl)
    mask = torch.zeros(2, 1, length)
    mask[1, :, :valid] = 1
    y_pad, g_pad = run(selective_scan, padded, mask.expand(2, 6, length), impl=impl)
    assert rel_err(y_pad[1:, :, :valid], y_alone) < 1e-6
    for k in ("u", "delta", "B", "C", "z"):
        assert rel_err(g_pad[k][1:, ..., :valid], g_alone[k]) < 1e-5, k
        assert (g_pad[k][1:, ..., valid:] == 0).all(), k


@pytest.mark.parametrize("impl", ["auto", *CPU_IMPLS])
def test_scan_rejects_bad_shapes(impl: str) -> None:
    inputs = {k: v.detach() for k, v in scan_inputs(2, 3, 4, 5, torch.float32).items()}
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**(inputs | {"B": inputs["B"][:, :, :4]}), impl=impl)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**(inputs | {"A": inputs["A"][:2]}), impl=impl)
    with pytest.raises(ValueError, match="impl must be"):
        selective_scan(**inputs, impl="fast")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- Mamba block


def reference_block(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm.Mamba's math (use_fast_path=False), step by step, straight from m's parameters."""
    length = x.shape[1]
    xz = x @ m.in_proj.weight.t()
    u, z = xz[..., : m.d_inner], xz[..., m.d_inner :]
    u = F.pad(u.transpose(1, 2), (m.d_conv - 1, 0))  # causal: left padding only
    u = F.silu(F.conv1d(u, m.conv1d.weight, m.conv1d.bias, groups=m.d_inner)).transpose(1, 2)
    dt, B, C = (u @ m.x_proj.weight.t()).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(dt @ m.dt_proj.weight.t() + m.dt_proj.bias)  # (b, L, d_inner)
    A = -torch.exp(m.A_log)
    h = x.new_zeros(x.shape[0], m.d_inner, m.d_state)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + m.D * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ m.out_proj.weight.t()


def test_parameter_names_shapes_and_init_match_mamba_ssm() -> None:
    torch.manual_seed(0)
    m = Mamba(384)  # MamFusion's setting: d_inner 768, dt_rank 24
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (768, 16),
        "D": (768,),
        "in_proj.weight": (1536, 384),
        "conv1d.weight": (768, 1, 4),
        "conv1d.bias": (768,),
        "x_proj.weight": (56, 768),
        "dt_proj.weight": (768, 24),
        "dt_proj.bias": (768,),
        "out_proj.weight": (384, 768),
    }
    assert torch.equal(m.A_log, torch.log(torch.arange(1.0, 17.0)).repeat(768, 1))
    assert torch.equal(m.D, torch.ones(768))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant
    assert m.dt_proj.weight.abs().max() <= 24**-0.5


def test_block_matches_step_by_step_reference_with_gradients() -> None:
    torch.manual_seed(0)
    m = Mamba(16, d_state=4).double()
    x = torch.randn(2, 45, 16, dtype=torch.float64, requires_grad=True)
    y, want = m(x), reference_block(m, x)
    assert rel_err(y, want) < 1e-10
    gy = torch.randn_like(y)
    params = dict(m.named_parameters())
    got = torch.autograd.grad(y, [x, *params.values()], gy)
    ref = torch.autograd.grad(want, [x, *params.values()], gy)
    for name, a, b in zip(["x", *params], got, ref, strict=True):
        assert rel_err(a, b) < 1e-10, name
        assert a.abs().sum() > 0, f"no gradient reaches {name}"


def test_block_is_deterministic_and_causal() -> None:
    def build() -> Mamba:
        torch.manual_seed(7)
        return Mamba(24)

    a, b = build(), build()
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    x = torch.randn(3, 70, 24)
    assert torch.equal(a(x), b(x))
    padded = torch.cat([x, torch.randn(3, 30, 24)], dim=1)  # anything after position 70 is "padding"
    assert rel_err(a(padded)[:, :70], a(x)) < 1e-6


def test_block_under_cpu_autocast_runs_the_scan_in_fp32() -> None:
    torch.manual_seed(0)
    m = Mamba(32)
    x = torch.randn(2, 40, 32)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), want) < 3e-2
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_impl_switch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="impl"):
        Mamba(8, impl="triton")  # type: ignore[arg-type]
    if isinstance(mamba_module._cuda_kernels(), str):  # the usual CPU case: mamba_ssm is not importable
        with pytest.raises(RuntimeError, match="selective_scan_fn is not importable"):
            Mamba(8, impl="cuda")

    def fused(*args, **kwargs):
        raise AssertionError("the CUDA kernels must not run on CPU tensors")

    monkeypatch.setattr(mamba_module, "_cuda_kernels", lambda: mamba_module._Kernels(fused, fused))
    x = torch.randn(1, 5, 8)
    Mamba(8, impl="auto")(x)  # CPU input: PyTorch path
    Mamba(8, impl="torch")(x)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        Mamba(8, impl="cuda")(x)


def test_block_impls_pick_their_cpu_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto takes the compiled scan on CPU where built, torch never does; compiled needs it built."""
    calls: list[str] = []
    original = scan_module._compiled_scan

    def spy(*args, **kwargs):
        calls.append("compiled")
        return original(*args, **kwargs)

    monkeypatch.setattr(scan_module, "_compiled_scan", spy)
    x = torch.randn(2, 9, 8)
    Mamba(8, impl="torch")(x)
    assert calls == []
    Mamba(8, impl="auto")(x)
    assert calls == (["compiled"] if compiled_paths() else [])
    if compiled_paths():
        Mamba(8, impl="compiled")(x)
        assert calls == ["compiled", "compiled"]
    else:
        with pytest.raises(CompiledScanUnavailableError, match="not part of this installation"):
            Mamba(8, impl="compiled")


@NOT_BUILT
def test_block_compiled_path_matches_torch_path_with_gradients() -> None:
    torch.manual_seed(0)
    compiled, ours = Mamba(20, d_state=16, impl="compiled"), Mamba(20, d_state=16, impl="torch")  # d_inner 40
    ours.load_state_dict(compiled.state_dict())
    x = torch.randn(3, 77, 20, requires_grad=True)
    gy = torch.randn(3, 77, 20)
    y_c, y_t = compiled(x), ours(x)
    assert rel_err(y_c, y_t) < 1e-5
    got = torch.autograd.grad(y_c, [x, *compiled.parameters()], gy)
    want = torch.autograd.grad(y_t, [x, *ours.parameters()], gy)
    for name, a, b in zip(["x", *dict(ours.named_parameters())], got, want, strict=True):
        assert rel_err(a, b) < 1e-5, name


# ------------------------------------------------------------------------------------------- CUDA (marked)


@pytest.mark.gpu
def test_fused_kernel_matches_our_scan_on_cuda() -> None:
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    for length in (32, 512):
        inputs = {
            k: v.detach().cuda().requires_grad_()
            for k, v in scan_inputs(2, 64, 16, length, torch.float32).items()
        }
        y_ours, g_ours = run(selective_scan, inputs)
        y_cuda, g_cuda = run(selective_scan_fn, inputs)
        torch.testing.assert_close(y_cuda, y_ours, rtol=6e-4, atol=2e-3)
        for name in NAMES:
            torch.testing.assert_close(g_cuda[name], g_ours[name], rtol=6e-4, atol=2e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("ours", ["chunked-cuda", pytest.param("compiled-cpu", marks=NOT_BUILT)])
def test_mamba_ssm_kernel_matches_our_scans_at_mamfusion_sizes(ours: str) -> None:
    """MamFusion's d_inner 768 / d_state 16 at the clip (32) and frame (512) lengths, random output gradient:
    mamba_ssm's fused CUDA kernel vs the chunked scan on CUDA or the compiled scan on CPU."""
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    for length in (32, 512):
        base = {k: v.detach() for k, v in scan_inputs(2, 768, 16, length, torch.float32, seed=length).items()}
        gy = torch.randn(2, 768, length, generator=torch.Generator().manual_seed(2))
        y_cuda, g_cuda = run(
            selective_scan_fn, {k: v.cuda().requires_grad_() for k, v in base.items()}, gy.cuda()
        )
        device, impl = ("cuda", "torch") if ours == "chunked-cuda" else ("cpu", "compiled")
        inputs = {k: v.to(device).requires_grad_() for k, v in base.items()}
        y, g = run(selective_scan, inputs, gy.to(device), impl=impl)
        torch.testing.assert_close(y_cuda.cpu(), y.cpu(), rtol=6e-4, atol=2e-3)
        assert rel_err(y.cpu(), y_cuda.cpu()) < 1e-4
        for name in NAMES:
            torch.testing.assert_close(g_cuda[name].cpu(), g[name].cpu(), rtol=6e-4, atol=2e-3, msg=name)
            assert rel_err(g[name].cpu(), g_cuda[name].cpu()) < 1e-3, name


@pytest.mark.gpu
def test_block_cuda_path_matches_torch_path_and_runs_under_autocast() -> None:
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    fused = Mamba(64, impl="cuda").cuda()
    ours = Mamba(64, impl="torch").cuda()
    ours.load_state_dict(fused.state_dict())
    x = torch.randn(2, 100, 64, device="cuda")
    torch.testing.assert_close(fused(x), ours(x), rtol=6e-4, atol=2e-3)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 5e-2)):
        for m in (fused, ours):
            m.zero_grad()
            with torch.autocast("cuda", dtype=dtype):
                y = m(x)
            y.float().square().mean().backward()
            assert torch.isfinite(y).all()
            assert all(torch.isfinite(p.grad).all() for p in m.parameters())
            assert rel_err(y.float(), ours(x).detach()) < 10 * tol


@pytest.mark.gpu
def test_our_scan_runs_on_cuda_tensors() -> None:
    inputs = scan_inputs(2, 8, 4, 100, torch.float64)
    y_cpu, g_cpu = run(selective_scan, inputs)
    y_gpu, g_gpu = run(selective_scan, {k: v.detach().cuda().requires_grad_() for k, v in inputs.items()})
    assert rel_err(y_gpu.cpu(), y_cpu) < 1e-12
    for name in NAMES:
        assert rel_err(g_gpu[name].cpu(), g_cpu[name]) < 1e-12, name
