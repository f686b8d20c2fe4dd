"""Mamba-1 selective scan on CPU: a chunked scan with a hand-written backward, plus the readable reference.

Recurrence per (batch, channel d, state n): h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = C_t . h_t.
Its decay differs per (d, n), so Mamba-2's matmul form would need K x K decays per (d, n): K times the scan's
own exp work. Instead time is cut into chunks of K steps and the recurrence runs for all chunks at once (K big
steps, not L small ones); a loop over the L/K chunks carries the chunk-boundary states (each chunk's total
decay is exp(A * the sum of its deltas), at most 1). Decays are only ever multiplied,
never divided, so nothing overflows (strong decays underflow to 0, which is exact enough). The backward
recomputes states per row group instead of keeping the (batch, L, d_state, d_inner) tensors autograd would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

DEFAULT_CHUNK = 16  # K: best, or within noise of it, for L = 32..1024 (bench_selective_scan.py sweep)
_GROUP_ELEMENTS = 1 << 19  # rows per group: each op touches ~this many elements (amortises Python, fits L3)
_LOG2E = 1.4426950408889634


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
) -> Tensor:
    """Selective scan with `mamba_ssm.selective_scan_fn`'s conventions, fast on CPU (any device works).

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,). Returns (batch, d_inner, L) in u's dtype; computes in fp32 (fp64 for fp64).
    """
    dtype_in, work = u.dtype, _work_dtype(u, delta, A, B, C)
    b, _, length = u.shape
    k = max(1, min(chunk_size, length))
    # Everything below runs in the step layout, so no elementwise op mixes memory layouts (slow on CPU).
    u, delta, B, C = (_to_steps(t.to(work), k) for t in (u, delta, B, C))
    delta = _delta(delta, None if delta_bias is None else delta_bias.to(work), delta_softplus)
    y = _ChunkedScan.apply(delta, delta * u, A.t().to(work).contiguous(), B, C, b)
    y = _gate(y, u, None if D is None else D.to(work), None if z is None else _to_steps(z.to(work), k))
    return _from_steps(y, b, length).to(dtype_in)
