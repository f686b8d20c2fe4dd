"""The MamFusion network (MODEL_SPEC §2-§5, §9): reference maths, masks, batch size 1, gradients, learning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.config import MamFusionConfig
from models.losses import MamFusionLoss
from models.mamfusion import BertAttention, MamFusion, VideoEmbedding, gaussian_weights
from models.optim import BertAdam, param_groups
from models.preprocess import QueryBatch, VideoBatch, collate_queries, collate_videos

MAMBA_UNIT_PARAMS = 963_840 + 768


def tiny(**overrides: object) -> MamFusionConfig:
    base = dict(
        visual_dim=12, query_dim=10, hidden_size=16, n_heads=2, max_ctx_l=24, map_size=8, max_desc_l=6,
        mamba_impl="torch",
    )  # fmt: skip
    return MamFusionConfig(**(base | overrides))


def make_model(seed: int = 0, **overrides: object) -> MamFusion:
    torch.manual_seed(seed)
    return MamFusion(tiny(**overrides)).eval()


def make_videos(lengths: tuple[int, ...], seed: int = 1, cfg: MamFusionConfig | None = None) -> VideoBatch:
    cfg = cfg or tiny()
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(t, cfg.visual_dim)).astype(np.float32) for t in lengths]
    return collate_videos(feats, cfg.map_size, cfg.max_ctx_l)


def make_queries(lengths: tuple[int, ...], seed: int = 2) -> QueryBatch:
    rng = np.random.default_rng(seed)
    return collate_queries([rng.normal(size=(n, 10)).astype(np.float32) for n in lengths], 6)


# --------------------------------------------------------------------------------------- reference maths
def test_gaussian_weights_by_hand() -> None:
    g = gaussian_weights(2, 0.5, torch.device("cpu"), torch.float64)
    # centres [0, 1/2], positions [0, 1], sigma = 0.5 / 9
    assert g[1].tolist() == [1.0, 1.0]
    assert g[0, 0].item() == 1.0
    assert g[0, 1].item() == pytest.approx(math.exp(-1 / (2 * (0.5 / 9) ** 2)), rel=1e-5)


def reference_attention(
    block: BertAttention, x: np.ndarray, mask: np.ndarray, width: float | None
) -> np.ndarray:
    """Independent numpy version of one block: multiplicative row-max-normalised Gaussian, -10000 mask, LN."""

    def lin(layer: torch.nn.Linear, h: np.ndarray) -> np.ndarray:
        return h @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()

    b, length, d = x.shape
    heads = block.self.n_heads
    dh = d // heads
    split = lambda h: h.reshape(b, length, heads, dh).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(lin(block.self.query, x)), split(lin(block.self.key, x)), split(lin(block.self.value, x))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    if width is not None:
        c, p, s = np.arange(length)[:, None] / length, np.linspace(0, 1, length)[None], width / 9
        g = 1 / (s * math.sqrt(2 * math.pi)) * np.exp(-((p - c) ** 2) / (2 * s**2))
        logits = logits * (g / g.max(axis=1, keepdims=True))
    logits = logits + (1 - mask)[:, None, None, :] * -10000.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, d)
    y = lin(block.output.dense, context) + x
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    ln = block.output.LayerNorm
    return y * ln.weight.detach().numpy() + ln.bias.detach().numpy()


@pytest.mark.parametrize("width", [None, 0.5, 1.0, 5.0])
def test_attention_block_matches_numpy_reference(width: float | None) -> None:
    torch.manual_seed(0)
    block = BertAttention(8, 2, dropout=0.0, width=width).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = np.random.default_rng(0).normal(size=(2, 7, 8))
    mask = np.ones((2, 7))
    mask[1, 4:] = 0
    got = block(torch.from_numpy(x), torch.from_numpy(mask)).detach().numpy()
    # the Gaussian weights are built in float32, as the original builds them
    tol = 1e-12 if width is None else 1e-6
    np.testing.assert_allclose(got, reference_attention(block, x, mask, width), rtol=tol, atol=tol)


def test_gmm_block_is_the_mean_of_its_four_blocks() -> None:
    model = make_model()
    x = torch.randn(2, 8, 16)
    block = model.clip_encoder
    members = [getattr(block, f"attn{i}") for i in range(4)]
    assert [m.self.width for m in members] == [None, 0.5, 1.0, 5.0]
    expected = sum(m(x) for m in members) / 4
    torch.testing.assert_close(block(x), expected)


def test_score_is_weighted_max_clip_cosine_plus_video_cosine() -> None:
    model = make_model()
    rng = np.random.default_rng(3)
    q, clips, video = rng.normal(size=(3, 16)), rng.normal(size=(2, 8, 16)), rng.normal(size=(2, 16))
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    per_clip = np.einsum("qd,vnd->qvn", unit(q), unit(clips))
    expected = 0.7 * per_clip.max(-1) + 0.3 * unit(q) @ unit(video).T
    emb = VideoEmbedding(torch.from_numpy(clips), torch.from_numpy(video))
    scores, best = model.score_with_moments(torch.from_numpy(q), emb)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10)
    assert best.tolist() == per_clip.argmax(-1).tolist()
    assert torch.equal(model.score(torch.from_numpy(q), emb), scores)


def test_fusion_equals_the_official_tiled_computation() -> None:
    model = make_model()
    q, v = torch.randn(5, 16), torch.randn(3, 16)
    v2t, t2v = model.v2t_fusion.multihead_attn, model.t2v_fusion.multihead_attn
    tiled = v.repeat(4, 1)  # the official code tiles the videos 4x before fusing
    fused_videos = tiled * v2t(tiled, q, q)[0]
    official = q * t2v(q, fused_videos, fused_videos)[0]
    torch.testing.assert_close(model.fuse_queries(q, v), official, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- masks, batch size 1
def test_query_padding_never_changes_valid_outputs() -> None:
    model = make_model()
    queries = make_queries((2, 6, 4))
    alone = model.encode_queries(QueryBatch(queries.tokens[:1, :2], queries.mask[:1, :2]))
    garbage = 5 * torch.randn_like(queries.tokens) * (1 - queries.mask[..., None])
    batched = model.encode_queries(QueryBatch(queries.tokens + garbage, queries.mask))
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched, model.encode_queries(queries), rtol=1e-5, atol=1e-6)


def test_clip_branch_does_not_depend_on_the_batch() -> None:
    model = make_model()
    videos = make_videos((5, 30, 9))
    batched = model.encode_clips(videos.clip_feats)
    alone = model.encode_clips(videos.clip_feats[1:2])
    torch.testing.assert_close(batched[1:2], alone, rtol=1e-5, atol=1e-6)


def test_frame_padding_content_never_changes_valid_outputs() -> None:
    model = make_model()
    videos = make_videos((5, 20, 9))
    pad = (1 - videos.frame_mask)[..., None]
    noisy = VideoBatch(
        videos.clip_feats,
        videos.frame_feats + 3 * torch.randn_like(videos.frame_feats) * pad,
        videos.frame_mask,
    )
    torch.testing.assert_close(
        model.encode_frames(noisy.frame_feats, noisy.frame_mask),
        model.encode_frames(videos.frame_feats, videos.frame_mask),
        rtol=1e-5,
        atol=1e-6,
    )


def sharpen_attention(model: MamFusion) -> MamFusion:
    """Scale up query/key weights: at init logits are ~0, attention is uniform and hides the Gaussians."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("self.query.weight", "self.key.weight")):
                p.mul_(50)
    return model


def test_frame_padding_length_matters_only_through_the_gaussians() -> None:
    videos = make_videos((5, 20))
    alone = VideoBatch(videos.clip_feats[:1], videos.frame_feats[:1, :5], videos.frame_mask[:1, :5])
    plain = sharpen_attention(
        make_model(gmm_widths=(None,))
    )  # masked attention + causal Mamba ignore padding
    torch.testing.assert_close(
        plain.encode_videos(videos).video[:1], plain.encode_videos(alone).video, rtol=1e-5, atol=1e-6
    )
    official = sharpen_attention(
        make_model()
    )  # Gaussian scale follows the padded length (§3.2), as the original
    padded, single = official.encode_videos(videos).video[:1], official.encode_videos(alone).video
    assert (padded - single).abs().max() > 1e-3


def test_batch_size_one_everywhere() -> None:
    model = make_model()
    videos, queries = make_videos((7,)), make_queries((3,))
    emb = model.encode_videos(videos)
    assert emb.clips.shape == (1, 8, 16) and emb.video.shape == (1, 16)
    q = model.encode_queries(queries)
    assert q.shape == (1, 16)
    scores, best = model.score_with_moments(q, emb)
    assert scores.shape == best.shape == (1, 1)
    model.train()
    out = model(videos, make_queries((3, 2)), [0, 0])
    total, _ = MamFusionLoss(model.config)(out, [0, 0], hard_negative=False)
    assert out.clip_scores.shape == (2, 1) and torch.isfinite(total)


def test_overlong_inputs_are_rejected() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="frame length 30"):
        model.encode_frames(torch.zeros(1, 30, 12), torch.ones(1, 30))


# --------------------------------------------------------------------------------------- training pass
def test_forward_shapes_and_what_feeds_the_qdl() -> None:
    videos, queries, labels = make_videos((5, 12, 9)), make_queries((2, 6, 4, 3, 5)), [0, 0, 1, 2, 2]
    model = make_model()
    out = model(videos, queries, labels)
    for s in (out.clip_scores, out.clip_scores_raw, out.frame_scores, out.frame_scores_raw):
        assert s.shape == (5, 3)
    assert out.clip_scores.abs().max() <= 1 + 1e-6
    q = model.encode_queries(queries)
    torch.testing.assert_close(out.diverse_queries, model.fuse_queries(q, model.encode_videos(videos).video))
    unfused = make_model(use_fusion=False)
    assert not any("fusion" in k for k in unfused.state_dict())
    torch.testing.assert_close(
        unfused(videos, queries, labels).diverse_queries, unfused.encode_queries(queries)
    )


def test_ablation_without_mamba_is_the_gmmformer_backbone() -> None:
    full, no_mamba = make_model(), make_model(use_mamba=False)
    assert not any("mamba" in k for k in no_mamba.state_dict())
    tvr_full = sum(p.numel() for p in MamFusion.from_preset("tvr").parameters())
    tvr_plain = sum(p.numel() for p in MamFusion.from_preset("tvr", use_mamba=False).parameters())
    assert tvr_full - tvr_plain == 4 * MAMBA_UNIT_PARAMS
    assert (
        no_mamba.encode_videos(make_videos((6,))).video.shape
        == full.encode_videos(make_videos((6,))).video.shape
    )


def test_initialisation_follows_the_official_rule() -> None:
    model = MamFusion.from_preset("tvr")
    w = model.clip_encoder_mamba[0].in_proj.weight
    assert abs(w.std().item() - 0.02) < 1e-3  # Mamba's own init is overwritten by N(0, 0.02)
    assert torch.all(model.clip_encoder_mamba[0].dt_proj.bias == 0)
    assert torch.allclose(model.frame_encoder_1_mamba[0].A_log[0], torch.log(torch.arange(1.0, 17.0)))
    assert torch.all(model.frame_encoder_1_mamba[0].D == 1)
    assert torch.all(model.query_encoder.output.LayerNorm.weight == 1)
    assert torch.all(model.query_encoder.self.key.bias == 0)
    assert torch.all(model.v2t_fusion.multihead_attn.in_proj_bias == 0)
    assert abs(model.clip_pos_embed.position_embeddings.weight.std().item() - 0.02) < 1e-3
    bound = math.sqrt(6 / (384 + 3 * 384))  # MHA in_proj keeps PyTorch's xavier-uniform default
    assert model.t2v_fusion.multihead_attn.in_proj_weight.abs().max() <= bound


def test_gradients_reach_every_parameter() -> None:
    model = make_model().train()
    labels = [0, 0, 1, 2, 2]
    out = model(make_videos((5, 12, 9)), make_queries((2, 6, 4, 3, 5)), labels)
    total, _ = MamFusionLoss(model.config)(out, labels, hard_negative=True)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_seeded_runs_are_identical() -> None:
    def run() -> tuple[torch.Tensor, float]:
        model = make_model(seed=5).train()
        torch.manual_seed(6)
        out = model(make_videos((5, 12)), make_queries((2, 6, 4)), [0, 0, 1])
        total, _ = MamFusionLoss(model.config)(out, [0, 0, 1], True, torch.Generator().manual_seed(1))
        return out.clip_scores, total.item()

    (a, la), (b, lb) = run(), run()
    assert torch.equal(a, b) and la == lb


# --------------------------------------------------------------------------------------- persistence
def test_save_and_load_pretrained_round_trip(tmp_path) -> None:
    model = make_model(use_fusion=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_fusion"] is False
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == model.state_dict().keys()
    loaded = MamFusion.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    videos = make_videos((6, 9))
    torch.testing.assert_close(loaded.encode_videos(videos).clips, model.encode_videos(videos).clips)


def test_from_preset_applies_overrides() -> None:
    model = MamFusion.from_preset("demo", hidden_size=32, n_heads=4, visual_dim=20)
    assert model.config.hidden_size == 32 and model.config.query_dim == 384
    assert model.clip_input_proj.net[1].weight.shape == (32, 20)


# --------------------------------------------------------------------------------------- learning sanity
def synthetic_task(n_videos: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Each video hides a topic vector in a few frames; its two queries are noisy projections of it."""
    rng = np.random.default_rng(seed)
    to_visual, to_text = rng.normal(size=(6, 12)), rng.normal(size=(6, 10))
    videos, queries, labels = [], [], []
    for v in range(n_videos):
        topic = rng.normal(size=6)
        frames = rng.normal(size=(16, 12)) * 0.5
        start = rng.integers(0, 12)
        frames[start : start + 4] += topic @ to_visual
        videos.append(frames.astype(np.float32))
        for _ in range(2):
            queries.append((topic @ to_text + 0.3 * rng.normal(size=(4, 10))).astype(np.float32))
            labels.append(v)
    return videos, queries, labels


def recall_at_1(model: MamFusion, videos: VideoBatch, queries: QueryBatch, labels: list[int]) -> float:
    model.eval()
    with torch.no_grad():
        scores = model.score(model.encode_queries(queries), model.encode_videos(videos))
    return (scores.argmax(dim=1) == torch.tensor(labels)).float().mean().item()


@pytest.fixture
def one_thread():
    """Tiny ops run fastest on one thread, and the shared CI cores stay free for the others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_150_steps_learn_a_synthetic_task(one_thread) -> None:
    cfg = tiny(input_drop=0.0, drop=0.0, loss_factor=(0.05, 0.05, 0.01))
    torch.manual_seed(0)
    model = MamFusion(cfg)
    feats, tokens, labels = synthetic_task(16, seed=0)
    videos = collate_videos(feats, cfg.map_size, cfg.max_ctx_l)
    queries = collate_queries(tokens, cfg.max_desc_l)
    criterion = MamFusionLoss(cfg)
    opt = BertAdam(param_groups(model, 0.01), lr=3e-3, warmup=0.05, t_total=150)
    g = torch.Generator().manual_seed(0)
    before = recall_at_1(model, videos, queries, labels)
    losses = []
    for step in range(150):
        model.train()
        batch = torch.randperm(16, generator=g)[:8].sort().values
        q_idx = [i for i, lab in enumerate(labels) if lab in set(batch.tolist())]
        remap = {int(v): k for k, v in enumerate(batch)}
        sub_labels = [remap[labels[i]] for i in q_idx]
        sub_videos = VideoBatch(videos.clip_feats[batch], videos.frame_feats[batch], videos.frame_mask[batch])
        sub_queries = QueryBatch(queries.tokens[q_idx], queries.mask[q_idx])
        out = model(sub_videos, sub_queries, sub_labels)
        total, _ = criterion(out, sub_labels, hard_negative=step >= 75, generator=g)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    after = recall_at_1(model, videos, queries, labels)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert after >= 0.8 and after > before + 0.3


def test_package_exports_resolve() -> None:
    import models

    assert models.MamFusion is MamFusion
    assert all(getattr(models, name) is not None for name in models.__all__)
