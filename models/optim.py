"""BertAdam and the warmup-linear schedule of MODEL_SPEC §8 (pytorch-pretrained-BERT semantics).

Differences from torch.optim.AdamW that matter for reproducing the official dynamics: no bias correction,
the weight decay is added to the Adam update (scaled by the scheduled lr), and gradients are clipped to
max-norm 1.0 *per tensor* inside `step`. The schedule position is each parameter's own step count, kept in the
optimiser state, so `state_dict()` / `load_state_dict()` resume the schedule exactly; groups hold only plain
numbers (so the state loads with `weights_only=True`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def warmup_linear(step: int, t_total: int, warmup: float) -> float:
    """LR multiplier: linear 0 -> 1 over the first `warmup` fraction of `t_total`, then linearly down to 0.

    `t_total < 0` means no schedule (multiplier 1). Step 0 gives 0, so the very first update does nothing.
    """
    if t_total < 0:
        return 1.0
    progress = step / t_total
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Official grouping: names containing "bias", "LayerNorm.bias" or "LayerNorm.weight" get no decay.

    With the official module names this leaves the LayerNorms after each Mamba (`*_mamba.1.weight`), Mamba's
    `A_log`/`D` and the MHA `in_proj_weight` decayed, exactly as the original.
    """
    named = list(model.named_parameters())
    decay = [p for n, p in named if not any(nd in n for nd in NO_DECAY)]
    no_decay = [p for n, p in named if any(nd in n for nd in NO_DECAY)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, decoupled weight decay, per-tensor clipping, warmup-linear lr."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        warmup: float = -1.0,
        t_total: int = -1,
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= warmup < 1.0 or warmup == -1):
            raise ValueError(f"invalid warmup {warmup}: must be in [0, 1) or -1")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"invalid betas ({b1}, {b2}): must be in [0, 1)")
        if e < 0.0:
            raise ValueError(f"invalid epsilon {e}: must be >= 0")
        defaults = dict(
            lr=lr, warmup=max(warmup, 0.0), t_total=t_total, b1=b1, b2=b2, e=e,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        )  # fmt: skip
        super().__init__(params, defaults)

    def current_lr(self) -> float:
        """The lr the next update of the first stepped parameter will use (0.0 before any step)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    return group["lr"] * warmup_linear(state["step"], group["t_total"], group["warmup"])
        return 0.0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["next_m"] = torch.zeros_like(p)
            state["next_v"] = torch.zeros_like(p)
        if group["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(p, group["max_grad_norm"])
        grad, m, v = p.grad, state["next_m"], state["next_v"]
        m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
        v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
        update = m / (v.sqrt() + group["e"])
        if group["weight_decay"] > 0.0:
            update.add_(p, alpha=group["weight_decay"])
        lr = group["lr"] * warmup_linear(state["step"], group["t_total"], group["warmup"])
        p.add_(update, alpha=-lr)
        state["step"] += 1
