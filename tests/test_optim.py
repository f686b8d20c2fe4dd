"""BertAdam and warmup-linear (MODEL_SPEC §8): updates by hand, schedule values, clipping, groups, resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from models.config import MamFusionConfig
from models.mamfusion import MamFusion
from models.optim import BertAdam, param_groups, warmup_linear


def test_warmup_linear_values() -> None:
    assert warmup_linear(0, 100, 0.1) == 0.0
    assert warmup_linear(5, 100, 0.1) == pytest.approx(0.5)
    assert warmup_linear(10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_linear(55, 100, 0.1) == pytest.approx(0.5)
    assert warmup_linear(100, 100, 0.1) == 0.0
    assert warmup_linear(130, 100, 0.1) == 0.0
    assert warmup_linear(7, -1, 0.1) == 1.0


def test_two_steps_by_hand_no_bias_correction() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = BertAdam([p], lr=0.1, weight_decay=0.01)  # no schedule: multiplier 1
    grads = [np.array([0.5, 0.1]), np.array([-0.2, 0.3])]
    m, v, expected = np.zeros(2), np.zeros(2), np.array([1.0, -2.0])
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        expected = expected - 0.1 * (m / (np.sqrt(v) + 1e-6) + 0.01 * expected)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12)


def test_first_scheduled_step_uses_lr_zero() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = BertAdam([p], lr=1.0, warmup=0.1, t_total=10)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert opt.current_lr() == pytest.approx(1.0)  # step 1 of 10 = end of warmup


def test_clipping_is_per_tensor() -> None:
    big, small = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = BertAdam([big, small], lr=0.0, weight_decay=0.0)
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    opt.step()
    # m = 0.1 * clipped grad: only the tensor whose own norm exceeds 1 is scaled (to norm 1)
    np.testing.assert_allclose(opt.state[big]["next_m"].numpy(), 0.1 * np.array([0.6, 0.8]), rtol=1e-5)
    np.testing.assert_allclose(opt.state[small]["next_m"].numpy(), 0.1 * np.array([0.3, 0.4]), rtol=1e-6)


def test_param_groups_follow_the_official_name_rule() -> None:
    model = MamFusion(MamFusionConfig(visual_dim=8, query_dim=8, hidden_size=16, n_heads=2, max_ctx_l=32))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert {
        "query_encoder.output.LayerNorm.weight",
        "clip_pos_embed.LayerNorm.weight",
        "frame_input_proj.LayerNorm.weight",
        "clip_encoder_mamba.1.bias",
        "v2t_fusion.multihead_attn.in_proj_bias",
        "frame_encoder_2_mamba.0.dt_proj.bias",
    } <= kept
    # the LayerNorm after each Mamba and Mamba's A_log / D are decayed, as in the official code
    assert {
        "clip_encoder_mamba.1.weight",
        "frame_encoder_1_mamba.0.A_log",
        "frame_encoder_1_mamba.0.D",
        "t2v_fusion.multihead_attn.in_proj_weight",
        "query_input_proj.net.1.weight",
    } <= decayed


def _train(model: nn.Module, opt: BertAdam, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, generator=g)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


def test_state_dict_resumes_the_schedule_exactly() -> None:
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a = BertAdam(param_groups(a, 0.01), lr=0.05, warmup=0.2, t_total=10)
    _train(a, opt_a, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b = BertAdam(param_groups(b, 0.01), lr=0.05, warmup=0.2, t_total=10)
    opt_b.load_state_dict(saved["optim"])
    assert opt_b.current_lr() == pytest.approx(opt_a.current_lr()) and opt_a.current_lr() > 0
    _train(a, opt_a, 2, seed=2)
    _train(b, opt_b, 2, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_invalid_arguments_are_rejected() -> None:
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="learning rate"):
        BertAdam(p, lr=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        BertAdam(p, lr=0.1, warmup=1.5)
