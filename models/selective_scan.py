"""Mamba-1 selective scan on CPU: a chunked scan with a hand-written backward, plus the readable reference.

Recurrence per (batch, channel d, state n): h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = C_t . h_t.
Its decay differs per (d, n), so Mamba-2's matmul form would need K x K decays per (d, n): K times the scan's
own exp work. Instead time is cut into chunks of K steps and the recurrence runs for all chunks at once (K big
steps, not L small ones); a loop over the L/K chunks carries the chunk-boundary states (each chunk's total
decay is exp(A * the sum of its deltas), at most 1). Decays are only ever multiplied,
never divided, so nothing overflows (strong decays underflow to 0, which is exact enough). The backward
recomputes states per row group instead of keeping the (batch, L, d_state, d_inner) tensors autograd would.

Where the install built it, a compiled kernel (`models._selective_scan`, `_selective_scan.c`) does the same
scan fused, softplus and gate included: sequential over L per (batch row, one vector of channels), states
in registers, reading the inputs where they lie (any strides), the backward re-running the forward per
chunk from kept chunk-boundary states; rows and channel groups are split over torch's intra-op thread count
(the module releases the GIL). `selective_scan(impl="auto")` uses it for fp32-or-narrower CPU inputs; the
chunked scan stays the fallback (CUDA tensors, fp64, no compiler at install time) and, with the sequential
scan, the reference the kernel is tested against. The kernel is loaded from this package's directory only,
nothing is compiled at run time, and it picks its vector path (AVX-512, AVX2 + FMA, portable C) from the
CPU at run time, as tasks/scan.py's search kernel does; each path checks itself once against the chunked
scan before its first use.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from models.extensions import load_extension
from storage.errors import MamFusionError

log = logging.getLogger(__name__)

Impl = Literal["auto", "torch", "compiled"]
IMPLS: tuple[Impl, ...] = ("auto", "torch", "compiled")
DEFAULT_CHUNK = 16  # K: best, or within noise of it, for L = 32..1024 (bench_selective_scan.py sweep)
_GROUP_ELEMENTS = 1 << 19  # rows per group: each op touches ~this many elements (amortises Python, fits L3)
_LOG2E = 1.4426950408889634

EXTENSION = "models._selective_scan"
PACKAGE_DIR = Path(__file__).resolve().parent
PATHS = ("avx512", "avx2", "portable")  # every path the kernel has, best first (x86 has all three)
PATH_ENV = "MAMFUSION_SCAN_PATH"  # forces one of PATHS
LANES = 16  # unit of the thread split, in channels (the C module's LANES); A, D, bias are padded to it
MAX_STATE = 64  # largest d_state the kernel takes (its MAX_STATE)
KERNEL_CHUNK = 64  # steps per kept state; 16..256 within ~15%, larger ones grow the backward's buffers
MIN_STEPS_PER_THREAD = 4096  # item-steps (16 channels x d_state states each) worth a thread's hand-off
INSTALL_HINT = "reinstall mamfusion where a C compiler works (`pip install -e .`) to build it"


def _work_dtype(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> torch.dtype:
    """Check mamba_ssm's shapes; both scans compute in fp32 (fp64 stays fp64), as selective_scan_ref does."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u, delta must be (batch, d_inner, L), got {tuple(u.shape)}, {tuple(delta.shape)}")
    b, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d_inner={d}, d_state), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, A.shape[1], length):
            raise ValueError(
                f"{name} must be (batch, d_state, L) = {(b, A.shape[1], length)}, got {tuple(t.shape)}"
            )
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _delta(delta: Tensor, bias: Tensor | None, softplus: bool) -> Tensor:
    """The bias goes inside the softplus (mamba_ssm's delta_bias); `bias` is already broadcastable."""
    delta = delta if bias is None else delta + bias
    return F.softplus(delta) if softplus else delta


def _gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Skip connection D*u, then the output gate silu(z); `D` is already broadcastable."""
    y = y if D is None else y + u * D
    return y if z is None else y * F.silu(z)


def sequential_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Readable one-step-per-time-step scan (the math of mamba_ssm's `selective_scan_ref`), autograd backward.

    Kept as the reference the fast `selective_scan` is verified against (tests) and timed against (benchmark).
    """
    dtype_in, work = u.dtype, _work_dtype(u, delta, A, B, C)
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    delta = _delta(delta, None if delta_bias is None else delta_bias.to(work)[:, None], delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for u_t, d_t, b_t, c_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        h = torch.exp(d_t[:, :, None] * A) * h + (d_t * u_t)[:, :, None] * b_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    D = None if D is None else D.to(work)[:, None]
    return _gate(torch.stack(ys, dim=-1), u, D, None if z is None else z.to(work)).to(dtype_in)


def _decay(At2: Tensor, dl_j: Tensor, out: Tensor) -> Tensor:
    """exp(delta A) computed as exp2(delta A log2(e)) into `out`: exp2 is ~4x faster than exp on CPU."""
    return torch.mul(At2, dl_j[:, None, :], out=out).exp2_()


def _groups(rows: int, n: int, d: int) -> list[slice]:
    """Row groups processed together: big enough to amortise Python, small enough to stay in cache."""
    size = max(1, _GROUP_ELEMENTS // (n * d))
    return [slice(r0, r0 + size) for r0 in range(0, rows, size)]


def _to_steps(x: Tensor, k: int) -> Tensor:
    """(b, f, L) -> (K, b * n_chunks, f), zero-padded at the end: one contiguous (rows, f) slab per in-chunk
    position, every chunk a row, d (or n) innermost."""
    b, f, length = x.shape
    x = x.transpose(1, 2)
    if length % k:
        x = F.pad(x, (0, 0, 0, -length % k))
    return x.reshape(b, -1, k, f).permute(2, 0, 1, 3).reshape(k, -1, f)


def _from_steps(x: Tensor, b: int, length: int) -> Tensor:
    """Inverse of `_to_steps`: (b, f, L), end padding dropped."""
    k, rows, f = x.shape
    return x.view(k, b, rows // b, f).permute(1, 2, 0, 3).reshape(b, -1, f)[:, :length].transpose(1, 2)


def _steps(dl: Tensor, xu: Tensor, Bs: Tensor) -> tuple[tuple[Tensor, ...], ...]:
    """Per-step views shaped for the state update: dl (r, d), xu (r, 1, d), B (r, n, 1)."""
    return dl.unbind(0), xu[:, :, None].unbind(0), Bs[..., None].unbind(0)


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + B_t (delta u)_t, on (K, rows, .) inputs.

    States are (rows, n, d) with d innermost, so decays and rank-1 updates are contiguous vectorised ops and
    the contractions over n or d are bmm calls in their fast orientation. rows = batch * n_chunks.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, dl: Tensor, xu: Tensor, At: Tensor, Bs: Tensor, Cs: Tensor, b: int
    ) -> Tensor:
        At2 = At * _LOG2E
        with torch.autocast(dl.device.type, enabled=False):
            starts = _chunk_boundaries(dl, xu, Bs, At2, b, reverse=False)
            y = torch.empty_like(dl)
            for r in _groups(dl.shape[1], *At.shape):  # every chunk from its true starting state
                h, decay = starts[r].clone(), torch.empty_like(starts[r])
                for dl_j, xu_j, B_j, C_j, y_j in zip(
                    *_steps(dl[:, r], xu[:, r], Bs[:, r]),
                    Cs[:, r, None].unbind(0),
                    y[:, r, None].unbind(0),
                    strict=True,
                ):
                    h.mul_(_decay(At2, dl_j, out=decay)).addcmul_(B_j, xu_j)
                    torch.bmm(C_j, h, out=y_j)
        ctx.save_for_backward(dl, xu, At, Bs, Cs, starts)
        ctx.b = b
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, gy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, None]:
        dl, xu, At, Bs, Cs, starts = ctx.saved_tensors
        gy = gy.contiguous()
        g_dl, g_xu, g_B, g_C = (torch.empty_like(t) for t in (dl, xu, Bs, Cs))
        g_At = torch.zeros_like(At)
        with torch.autocast(dl.device.type, enabled=False):
            ends = _chunk_boundaries(dl, gy, Cs, At * _LOG2E, ctx.b, reverse=True)
            for r in _groups(dl.shape[1], *At.shape):
                g_At += _backward_rows(
                    (dl[:, r], xu[:, r], At, Bs[:, r], Cs[:, r], gy[:, r], starts[r], ends[r]),
                    (g_dl[:, r], g_xu[:, r], g_B[:, r], g_C[:, r]),
                )
        return g_dl, g_xu, g_At, g_B, g_C, None


def _chunk_boundaries(dl: Tensor, xu: Tensor, Bs: Tensor, At2: Tensor, b: int, reverse: bool) -> Tensor:
    """States entering each chunk, or (reverse=True) adjoints entering each chunk's last step.

    Runs every chunk from zero (K steps, all chunks at once), then carries across chunks with each chunk's
    total decay exp(A * sum(delta)) in a loop over the L/K chunks. In reverse, (xu, Bs) are (gy, Cs).
    """
    k, rows, d = dl.shape
    n = At2.shape[0]
    n_chunks = rows // b
    out = dl.new_zeros(rows, n, d)
    if n_chunks == 1:
        return out
    local = dl.new_zeros(rows, n, d)
    for r in _groups(rows, n, d):
        h, decay = local[r], torch.empty_like(local[r])
        steps = list(zip(*_steps(dl[:, r], xu[:, r], Bs[:, r]), strict=True))
        for dl_j, xu_j, B_j in reversed(steps) if reverse else steps:
            if reverse:  # g_j = C_j gy_j + a_{j+1} g_{j+1}; what leaves the chunk start is a_0 g_0
                h.addcmul_(B_j, xu_j).mul_(_decay(At2, dl_j, out=decay))
            else:
                h.mul_(_decay(At2, dl_j, out=decay)).addcmul_(B_j, xu_j)
    whole = torch.exp2(At2 * dl.sum(0)[:, None, :]).view(b, n_chunks, n, d)
    local, out4 = local.view(b, n_chunks, n, d), out.view(b, n_chunks, n, d)
    for c in reversed(range(n_chunks - 1)) if reverse else range(1, n_chunks):
        src = c + 1 if reverse else c - 1
        torch.addcmul(local[:, src], whole[:, src], out4[:, src], out=out4[:, c])
    return out


def _backward_rows(inputs: tuple[Tensor, ...], grads: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Gradients for a group of rows whose entering state and adjoint are known; returns the group's dA.

    inputs = (dl, xu, At, Bs, Cs, gy, start, end); grads = views (g_dl, g_xu, g_B, g_C) to fill. Keeps the
    group's K states (bounded memory: the group size), then walks back once.
    """
    dl, xu, At, Bs, Cs, gy, start, end = inputs
    At2 = At * _LOG2E
    dl_s, xu_s, B_s = _steps(dl, xu, Bs)
    C_s, gy_s, gxu_s, gB_s, gC_s = (t[:, :, None].unbind(0) for t in (Cs, gy, *grads[1:]))
    decay = torch.empty_like(start)
    h = dl.new_empty(len(dl_s) + 1, *start.shape)  # h[j + 1] = state after step j; h[0] = entering state
    h[0] = start
    for j, (dl_j, xu_j, B_j) in enumerate(zip(dl_s, xu_s, B_s, strict=True)):
        torch.mul(_decay(At2, dl_j, out=decay), h[j], out=h[j + 1]).addcmul_(B_j, xu_j)
    g, carry, m = torch.empty_like(start), end.clone(), torch.empty_like(start)
    acc_A = torch.zeros_like(start)
    for j in reversed(range(len(dl_s))):
        torch.addcmul(carry, C_s[j].transpose(1, 2), gy_s[j], out=g)  # g_j = dLoss/dh_j
        torch.bmm(B_s[j].transpose(1, 2), g, out=gxu_s[j])
        torch.bmm(xu_s[j], g.transpose(1, 2), out=gB_s[j])
        torch.bmm(gy_s[j], h[j + 1].transpose(1, 2), out=gC_s[j])
        torch.mul(_decay(At2, dl_s[j], out=decay), g, out=carry)
        torch.mul(carry, h[j], out=m)  # dLoss/d(delta_j A) = a_j g_j h_{j-1}
        acc_A.addcmul_(m, dl_s[j][:, None, :])
        torch.sum(m.mul_(At), dim=1, out=grads[0][j])
    return acc_A.sum(0)


class CompiledScanUnavailableError(MamFusionError, RuntimeError):
    """The compiled scan was asked for but cannot run here (not built, or path or inputs unsupported)."""


def _import_extension() -> ModuleType:
    """The compiled module, from its file in this package's directory only (`models.extensions`)."""
    return load_extension(EXTENSION, PACKAGE_DIR)


@functools.cache
def _extension() -> ModuleType | CompiledScanUnavailableError:
    """The compiled module, or why it cannot be used (remembered: the install does not change while the
    process runs)."""
    try:
        ext = _import_extension()
    except ImportError as e:
        return CompiledScanUnavailableError(
            f"the compiled selective scan ({EXTENSION}) is not part of this installation ({e}); "
            + INSTALL_HINT
        )
    if (ext.LANES, ext.MAX_STATE) != (LANES, MAX_STATE):
        return CompiledScanUnavailableError(
            f"{EXTENSION} is from another version of mamfusion; {INSTALL_HINT}"
        )
    return ext


def compiled_paths() -> tuple[str, ...]:
    """The compiled scan's code paths this CPU can run, best first (empty without the extension)."""
    ext = _extension()
    return () if isinstance(ext, CompiledScanUnavailableError) else tuple(ext.paths())


def compiled_path() -> str:
    """The path the compiled scan runs: `$MAMFUSION_SCAN_PATH` where set (to compare paths, or to pin one
    across machines), else the best this CPU supports."""
    ext = _extension()
    if isinstance(ext, CompiledScanUnavailableError):
        raise ext
    supported, forced = compiled_paths(), os.environ.get(PATH_ENV)
    if not forced:
        return supported[0]
    if forced not in supported:
        why = "not supported by this CPU" if forced in PATHS else "unknown"
        raise CompiledScanUnavailableError(
            f"{PATH_ENV}={forced}: that selective scan path is {why} (here: {', '.join(supported)})"
        )
    return forced


@functools.cache
def _self_check(path: str) -> CompiledScanUnavailableError | None:
    """Run `path` once, forward and backward, on probes against the chunked scan: a miscompiled or
    mis-dispatched kernel must never train or encode anything."""
    # d = 21: a partial channel group (and, on narrow paths, groups of padding only); d_state 16 takes the
    # unrolled state loop, 5 the generic one; L = 37 spans three chunks of 16, the last one partial
    for d, n in ((21, 16), (21, 5)):
        if not _matches_chunked(path, d, n, length=37):
            return CompiledScanUnavailableError(f"the compiled selective scan's {path} path is wrong here")
    log.debug("compiled selective scan: %s path", path)
    return None


def _matches_chunked(path: str, d: int, n: int, length: int, b: int = 2) -> bool:
    """Whether `path` gives the chunked scan's output and gradients on random inputs of this size."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"u": (b, d, length), "delta": (b, d, length), "A": (d, n), "B": (b, n, length)}
    shapes |= {"C": (b, n, length), "D": (d,), "z": (b, d, length), "delta_bias": (d,)}
    probe = {k: torch.randn(*v, generator=gen) for k, v in shapes.items()}
    probe["A"] = -probe["A"].exp()
    gy = torch.randn(b, d, length, generator=gen)
    results = []
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        for impl in ("compiled", "torch"):
            inputs = {k: v.clone().requires_grad_() for k, v in probe.items()}
            if impl == "compiled":
                y = _compiled_scan(**inputs, delta_softplus=True, path=path, chunk=16)
            else:
                y = selective_scan(**inputs, delta_softplus=True, impl="torch")
            results.append([y.detach(), *torch.autograd.grad(y, list(inputs.values()), gy)])
    return all(
        torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        for got, want in zip(*results, strict=True)
    )


def _loaded() -> ModuleType:
    """The extension module, or CompiledScanUnavailableError (`_kernel` also vets the path)."""
    ext = _extension()
    if isinstance(ext, CompiledScanUnavailableError):
        raise ext
    return ext


def _kernel(path: str | None = None) -> tuple[ModuleType, str]:
    """The extension and `path` (default: `compiled_path()`) once that path has passed its self-check; else
    CompiledScanUnavailableError saying why not."""
    ext = _loaded()
    path = path or compiled_path()
    if path not in compiled_paths():
        raise CompiledScanUnavailableError(
            f"selective scan path {path!r} is not available on this CPU (here: {', '.join(compiled_paths())})"
        )
    problem = _self_check(path)
    if problem is not None:
        raise problem
    return ext, path


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mamfusion-selective-scan")


# A forked child inherits the pools' bookkeeping but not their threads: it starts pools of its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _grid(b: int, groups: int, length: int) -> tuple[int, int]:
    """Workers as (batch parts, channel-group parts): torch's intra-op thread count, fewer for small scans.

    Batch rows are split first (no two workers then add into the same dB / dC rows); channel groups only
    when there are more threads than rows.
    """
    work = b * groups * length
    workers = max(1, min(torch.get_num_threads(), work // MIN_STEPS_PER_THREAD))
    batch_parts = min(b, workers)
    return batch_parts, max(1, min(groups, workers // batch_parts))


def _cuts(total: int, parts: int) -> list[tuple[int, int]]:
    return [(total * p // parts, total * (p + 1) // parts) for p in range(parts)]


def _run_parts(parts: list[tuple[int, ...]], call: Callable[..., None]) -> None:
    """`call(*part)` for every worker's part, in parallel (the module releases the GIL while it scans)."""
    if len(parts) == 1:
        call(*parts[0])
        return
    for _ in _pool(len(parts)).map(lambda p: call(*p), parts):
        pass


class _CompiledScan(torch.autograd.Function):
    """The compiled kernel as an autograd Function. u, delta, z: (b, d, L); B, C: (b, n, L) - fp32, any
    strides, as the kernel reads them tile by tile; A: (n, dp); D, bias: (dp,) - contiguous, zero-padded to
    dp, d rounded up to LANES. Returns y like u: (b, d, L)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        z: Tensor | None,
        bias: Tensor,
        softplus: bool,
        chunk: int,
        path: str,
    ) -> Tensor:
        ext = _loaded()
        (b, d, length), n = u.shape, A.shape[0]
        keep = any(ctx.needs_input_grad[:8])  # inference keeps no states
        states = u.new_empty(b, -(-length // chunk), n, A.shape[1]) if keep else None
        y = torch.empty_like(u)
        tensors = (*_arrays(u, delta, z, B, C, A, D, bias), y.numpy(), *_arrays(states))
        dims = (b, length, d, n)

        def call(_x: int, _y: int, i0: int, i1: int, g0: int, g1: int) -> None:
            ext.forward(tensors, dims, (i0, i1, g0, g1), chunk, softplus, path)

        batch_parts, group_parts = _grid(b, A.shape[1] // LANES, length)
        _run_parts(_parts(b, A.shape[1] // LANES, batch_parts, group_parts), call)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, states)
        ctx.softplus, ctx.chunk, ctx.path = softplus, chunk, path
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, gy: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, bias, states = ctx.saved_tensors
        ext = _loaded()
        (b, d, length), (n, dp) = u.shape, A.shape
        gy = gy.to(torch.float32)
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gz = None if z is None else torch.empty_like(z)
        batch_parts, group_parts = _grid(b, dp // LANES, length)
        # each batch part sums dA, dD, d(bias) over its rows, each channel part dB, dC over its channels
        gA, gD, gbias = (
            A.new_zeros(batch_parts, n, dp),
            A.new_zeros(batch_parts, dp),
            A.new_zeros(batch_parts, dp),
        )
        gB, gC = (u.new_zeros(group_parts, b, n, length) for _ in range(2))
        inputs = (*_arrays(u, delta, z, B, C, A, D, bias), states.numpy(), gy.numpy())
        outputs = _arrays(gu, gdelta, gz)
        dims = (b, length, d, n)

        def call(x: int, y: int, i0: int, i1: int, g0: int, g1: int) -> None:
            parts = _arrays(gB[y], gC[y], gA[x], gD[x], gbias[x])
            ext.backward(
                (*inputs, *outputs, *parts), dims, (i0, i1, g0, g1), ctx.chunk, ctx.softplus, ctx.path
            )

        _run_parts(_parts(b, dp // LANES, batch_parts, group_parts), call)
        gB, gC = (t[0] if group_parts == 1 else t.sum(0) for t in (gB, gC))
        gA, gD, gbias = (t[0] if batch_parts == 1 else t.sum(0) for t in (gA, gD, gbias))
        return gu, gdelta, gA, gB, gC, gD, gz, gbias, None, None, None


def _arrays(*tensors: Tensor | None) -> tuple[object, ...]:
    """Buffers for the module (numpy views, strides kept; None stays None): it checks shapes and types."""
    return tuple(None if t is None else t.detach().numpy() for t in tensors)


def _parts(b: int, groups: int, batch_parts: int, group_parts: int) -> list[tuple[int, ...]]:
    """Each worker's (batch part, channel part, first row, end row, first channel group, end group)."""
    return [
        (x, y, *rows, *cols)
        for x, rows in enumerate(_cuts(b, batch_parts))
        for y, cols in enumerate(_cuts(groups, group_parts))
    ]


def _compiled_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    path: str | None = None,
    chunk: int | None = None,
) -> Tensor:
    """`selective_scan` through the compiled kernel, in fp32, reading the inputs where they lie (no copies
    unless they are not fp32); only the small A, D and bias are padded to whole channel groups."""
    dtype_in, (_, d, _) = u.dtype, u.shape
    pad = -d % LANES
    f32 = torch.float32

    def vec(t: Tensor | None) -> Tensor:
        return F.pad(u.new_zeros(d, dtype=f32) if t is None else t.to(f32), (0, pad))

    with torch.autocast(u.device.type, enabled=False):
        y = _CompiledScan.apply(
            u.to(f32),
            delta.to(f32),
            F.pad(A.to(f32).t(), (0, pad)).contiguous(),
            B.to(f32),
            C.to(f32),
            vec(D),
            None if z is None else z.to(f32),
            vec(delta_bias),
            delta_softplus,
            chunk or KERNEL_CHUNK,
            path or compiled_path(),
        )
    return y.to(dtype_in)


@functools.cache
def _note_fallback(reason: str) -> None:
    """Say once per process (and reason), on one line, that `auto` scans without the compiled kernel."""
    log.warning("compiled selective scan unavailable (%s); using the chunked PyTorch scan", reason)


def _why_not_compiled(u: Tensor, work: torch.dtype, d_state: int) -> str | None:
    """Why these inputs cannot take the compiled kernel (None: they can), for `auto` and `compiled`."""
    if u.device.type != "cpu":
        return f"it runs on CPU tensors, these are on {u.device}"
    if work != torch.float32:
        return "it computes in fp32; fp64 inputs take the chunked scan (impl='torch')"
    if d_state > MAX_STATE:
        return f"it takes d_state up to {MAX_STATE}, got {d_state}"
    if u.numel() == 0 or d_state == 0:
        return "the inputs are empty"
    return None


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    impl: Impl = "auto",
) -> Tensor:
    """Selective scan with `mamba_ssm.selective_scan_fn`'s conventions, fast on CPU (any device works).

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,). Returns (batch, d_inner, L) in u's dtype; computes in fp32 (fp64 for fp64).
    impl: "torch" is the chunked PyTorch scan (chunk_size steps per chunk); "compiled" the compiled kernel
    (CPU, fp32 compute; CompiledScanUnavailableError where it cannot run); "auto" the kernel where it can
    run, else (saying once why, if it is not installed) the chunked scan.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    dtype_in, work = u.dtype, _work_dtype(u, delta, A, B, C)
    if impl != "torch":
        reason = _why_not_compiled(u, work, A.shape[1])
        if reason is None:
            try:
                _kernel()
            except CompiledScanUnavailableError as e:
                if impl == "compiled":
                    raise
                _note_fallback(str(e))
            else:
                return _compiled_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        elif impl == "compiled":
            raise CompiledScanUnavailableError(f"impl='compiled' cannot scan these inputs: {reason}")
    b, _, length = u.shape
    k = max(1, min(chunk_size, length))
    # Everything below runs in the step layout, so no elementwise op mixes memory layouts (slow on CPU).
    u, delta, B, C = (_to_steps(t.to(work), k) for t in (u, delta, B, C))
    delta = _delta(delta, None if delta_bias is None else delta_bias.to(work), delta_softplus)
    y = _ChunkedScan.apply(delta, delta * u, A.t().to(work).contiguous(), B, C, b)
    y = _gate(y, u, None if D is None else D.to(work), None if z is None else _to_steps(z.to(work), k))
    return _from_steps(y, b, length).to(dtype_in)
