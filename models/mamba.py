"""Mamba-1 block in pure PyTorch, with mamba_ssm's parameter names, and its CUDA kernels when available.

`mamba_ssm` only ships CUDA kernels (and cannot even be imported on CPU), so the block here re-implements
`mamba_ssm.Mamba` (Mamba-1, ``use_fast_path=False``) from the published math, with the same state_dict keys
and shapes so official checkpoints load unchanged. On CUDA with mamba_ssm installed it uses the fused kernels;
on CPU the compiled scan of models/selective_scan.py where the install built it, else the chunked one.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.selective_scan import (
    CompiledScanUnavailableError,
    compiled_paths,
    selective_scan,
    sequential_selective_scan,
)

logger = logging.getLogger(__name__)

Impl = Literal["auto", "torch", "compiled", "cuda"]
IMPLS: tuple[Impl, ...] = ("auto", "torch", "compiled", "cuda")
__all__ = ["Mamba", "selective_scan", "sequential_selective_scan"]


def _at_least_fp32(t: Tensor) -> Tensor:
    """A, D and the dt bias enter the scan in fp32 as in mamba_ssm (fp16 would lose precision); fp64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _Kernels(NamedTuple):
    scan: Callable[..., Tensor]  # mamba_ssm.ops.selective_scan_interface.selective_scan_fn
    conv: Callable[..., Tensor] | None  # causal_conv1d.causal_conv1d_fn (optional, as in mamba_ssm)


@functools.cache
def _cuda_kernels() -> _Kernels | str:
    """mamba_ssm's fused kernels, or why they are unavailable. Imported lazily: without CUDA even
    `import mamba_ssm` fails (missing selective_scan_cuda / triton), in ways that are not all ImportError."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:
        return f"mamba_ssm's selective_scan_fn is not importable ({type(exc).__name__}: {exc})"
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as exc:
        logger.info("causal_conv1d unavailable (%s: %s); Mamba uses nn.Conv1d", type(exc).__name__, exc)
        causal_conv1d_fn = None
    return _Kernels(selective_scan_fn, causal_conv1d_fn)


class Mamba(nn.Module):
    """Mamba-1 block, parameter-compatible with `mamba_ssm.Mamba` (state_dict keys and shapes).

    impl: "torch" always uses the pure-PyTorch path (the chunked scan); "compiled" the compiled CPU scan
    (clear error where it is not built, or for CUDA inputs); "cuda" requires mamba_ssm's kernels (clear error
    otherwise); "auto" uses mamba_ssm's kernels for CUDA inputs when they import, else `selective_scan`'s
    own "auto" (the compiled scan for CPU inputs where built, else the chunked one). The block is causal:
    positions after t never change output t, so end padding leaves valid outputs untouched.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.impl: Impl = impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._init_ssm(dt_min, dt_max, dt_init_floor)
        if impl == "cuda" and isinstance(missing := _cuda_kernels(), str):
            raise RuntimeError(f"Mamba(impl='cuda'): {missing}; install the extra: pip install '.[cuda]'")
        if impl == "compiled" and not compiled_paths():
            raise CompiledScanUnavailableError(
                "Mamba(impl='compiled'): the compiled selective scan is not part of this installation; "
                "reinstall where a C compiler works (`pip install -e .`)"
            )

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """mamba_ssm's special init: dt bias = softplus^-1(log-uniform dt), A = -(1..d_state), D = 1."""
        dt_init_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def _kernels(self, x: Tensor) -> _Kernels | None:
        """The fused kernels when this call should use them (see `impl`), else None for the PyTorch path."""
        if self.impl in ("torch", "compiled") or (self.impl == "auto" and not x.is_cuda):
            return None
        kernels = _cuda_kernels()
        if self.impl == "cuda" and (isinstance(kernels, str) or not x.is_cuda):
            reason = kernels if isinstance(kernels, str) else f"the input is on {x.device}"
            raise RuntimeError(f"Mamba(impl='cuda') needs CUDA tensors and mamba_ssm's kernels: {reason}")
        if isinstance(kernels, str):
            logger.warning("Mamba(impl='auto') on CUDA falls back to the PyTorch scan: %s", kernels)
            return None
        return kernels

    def forward(self, hidden: Tensor) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        length = hidden.shape[1]
        kernels = self._kernels(hidden)
        # (b, 2 d_inner, L) view of the (b, L, 2 d_inner) projection; the CUDA kernels want L innermost, the
        # PyTorch scan re-lays its inputs out itself (a cheap copy from this d-innermost memory).
        xz = self.in_proj(hidden).transpose(1, 2)
        x, z = (xz.contiguous() if kernels else xz).chunk(2, dim=1)
        if kernels and kernels.conv is not None:
            x = kernels.conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        elif kernels:
            x = F.silu(self.conv1d(x)[..., :length])
        else:  # the same values laid out (b, L, d): the compiled scan then reads and writes whole vectors
            x = F.silu(self.conv1d(x)[..., :length].transpose(1, 2).contiguous()).transpose(1, 2)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()  # the bias goes inside the softplus, as delta_bias
        dt, B, C = (t.transpose(1, 2) for t in (dt, B, C))
        if kernels:
            dt, B, C = dt.contiguous(), B.contiguous(), C.contiguous()
        if kernels:
            scan = kernels.scan
        else:
            # (impl "cuda" always has kernels here: `_kernels` raised otherwise)
            scan = functools.partial(selective_scan, impl="auto" if self.impl == "cuda" else self.impl)
        y = scan(
            x,
            dt,
            -torch.exp(_at_least_fp32(self.A_log)),
            B,
            C,
            _at_least_fp32(self.D),
            z=z,
            delta_bias=_at_least_fp32(self.dt_proj.bias),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))
