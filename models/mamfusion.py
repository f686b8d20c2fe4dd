"""MamFusion for Partially Relevant Video Retrieval, as the official code computes it (MODEL_SPEC §2-§5, §9).

A query is encoded by one attention block and attention-pooled into one vector. A video is encoded twice:
a 32-clip branch and a frame branch, each GMMBlock -> MambaUnit -> GMMBlock -> MambaUnit; the frame branch
is attention-pooled into one vector. Retrieval scores are `0.7 * max-clip cosine + 0.3 * video cosine`, so
videos and queries are encoded independently (the index stores video embeddings). The two fusion modules act
across the *samples of a training batch* on pooled vectors and only feed the query-diverse loss (§4).

Module and parameter names follow the official state_dict (`official_checkpoint_keys.tsv`), so checkpoints map
one to one and the optimiser's name-based no-decay rule treats every tensor as the official code does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import MamFusionConfig, load_preset
from models.mamba import Mamba
from models.preprocess import QueryBatch, VideoBatch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
_MASKED_LOGIT = -1e10  # pooling: padded positions (official `mask_logits`)
_MASKED_ATTENTION = -10000.0  # attention blocks: additive key-padding penalty (official value)


@dataclass
class VideoEmbedding:
    """Query-independent video representation: what a search index stores."""

    clips: Tensor  # (B, n_clips, d), not normalised
    video: Tensor  # (B, d), not normalised

    def to(self, device: torch.device | str) -> VideoEmbedding:
        return VideoEmbedding(self.clips.to(device), self.video.to(device))

    def __len__(self) -> int:
        return self.clips.shape[0]


@dataclass
class MamFusionOutput:
    """Everything the training losses need (MODEL_SPEC §6); all score matrices are (B_q, B_v)."""

    clip_scores: Tensor  # max-over-clips cosine
    clip_scores_raw: Tensor  # max-over-clips dot product (InfoNCE)
    frame_scores: Tensor  # pooled-video cosine
    frame_scores_raw: Tensor  # pooled-video dot product (InfoNCE)
    diverse_queries: Tensor  # (B_q, d): fused queries (or unfused with use_fusion=False) for the QDL


class LinearLayer(nn.Module):
    """Input projection: LayerNorm -> Dropout -> Linear -> ReLU (official names `LayerNorm`, `net.1`)."""

    def __init__(self, in_size: int, out_size: int, dropout: float) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(in_size)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_size, out_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.net(self.LayerNorm(x)))


class TrainablePositionalEncoding(nn.Module):
    """Learned absolute positions added to the features, then LayerNorm and Dropout."""

    def __init__(self, max_len: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.position_embeddings = nn.Embedding(max_len, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(positions)))


def gaussian_weights(length: int, width: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(L, L) multiplicative logit weights of a GMMFormer block, each row scaled to max 1.

    Centres i/L against positions linspace(0, 1, L), sigma = max(width, 0.01) / 9 in normalised time; the
    Gaussian constant cancels in the row normalisation.
    """
    centres = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1) / length
    positions = torch.linspace(0, 1, length, device=device, dtype=torch.float32).unsqueeze(0)
    sigma = max(width, 0.01) / 9
    g = torch.exp(-((positions - centres) ** 2) / (2 * sigma**2))
    return (g / g.amax(dim=-1, keepdim=True)).to(dtype)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with optional Gaussian weights multiplied onto the scaled logits."""

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, width: float | None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_size = hidden_size // n_heads
        self.width = width
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.n_heads, self.head_size).transpose(1, 2)  # (B, h, L, dh)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)  # (B, h, L, L)
        if self.width is not None:
            logits = logits * gaussian_weights(x.shape[1], self.width, x.device, logits.dtype)
        if mask is not None:
            logits = logits + (1 - mask[:, None, None, :].to(logits.dtype)) * _MASKED_ATTENTION
        probs = self.dropout(logits.softmax(dim=-1))
        return (probs @ v).transpose(1, 2).reshape(x.shape)


class BertSelfOutput(nn.Module):
    """Output projection -> Dropout -> residual -> LayerNorm (there is no feed-forward sub-layer)."""

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    """One attention block: the query encoder, and each of the four members of a GMMBlock."""

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, width: float | None = None) -> None:
        super().__init__()
        self.self = BertSelfAttention(hidden_size, n_heads, dropout, width)
        self.output = BertSelfOutput(hidden_size, dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.output(self.self(x, mask), x)


class GMMBlock(nn.Module):
    """Parallel attention blocks with different Gaussian widths (None = plain); output is their mean."""

    def __init__(
        self, hidden_size: int, n_heads: int, dropout: float, widths: Sequence[float | None]
    ) -> None:
        super().__init__()
        self.n_blocks = len(widths)
        for i, width in enumerate(widths):
            self.add_module(f"attn{i}", BertAttention(hidden_size, n_heads, dropout, width))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        outputs = [getattr(self, f"attn{i}")(x, mask) for i in range(self.n_blocks)]
        return torch.stack(outputs, dim=-1).mean(dim=-1)


class MambaUnit(nn.Sequential):
    """`x + LayerNorm(Mamba(x))`; a Sequential so the official names `<unit>.0.*` / `<unit>.1.*` are kept."""

    def __init__(self, config: MamFusionConfig) -> None:
        mamba = Mamba(
            config.hidden_size,
            d_state=config.mamba_d_state,
            d_conv=config.mamba_d_conv,
            expand=config.mamba_expand,
            impl=config.mamba_impl,
        )
        super().__init__(mamba, nn.LayerNorm(config.hidden_size, eps=1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class VisionLanguageFusionModule(nn.Module):
    """`tgt * MHA(tgt, memory, memory)` on 2-D inputs: attention runs across the samples of the batch.

    The official module also holds an unused Conv2d(5 -> 15680); we leave it out (see models.checkpoint).
    """

    def __init__(self, hidden_size: int, n_heads: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(hidden_size, n_heads, dropout=0.0)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        attended, _ = self.multihead_attn(tgt, memory, memory, need_weights=False)
        return tgt * attended


def attention_pool(x: Tensor, mask: Tensor, scorer: nn.Linear) -> Tensor:
    """(B, L, d) -> (B, d): softmax over valid positions of a learned linear score (padded get -1e10)."""
    logits = scorer(x).squeeze(-1).float().masked_fill(mask == 0, _MASKED_LOGIT)
    return torch.einsum("bl,bld->bd", logits.softmax(dim=-1).to(x.dtype), x)


def max_clip_scores(queries: Tensor, clips: Tensor) -> tuple[Tensor, Tensor]:
    """Best clip per (query, video): (B_q, d) x (B_v, n, d) -> values and clip indices, both (B_q, B_v)."""
    per_clip = torch.einsum("qd,vnd->qvn", queries, clips)
    return per_clip.max(dim=-1)


class MamFusion(nn.Module):
    """The MamFusion network; see the module docstring. Build with `MamFusion(config)` or `from_preset`."""

    def __init__(self, config: MamFusionConfig) -> None:
        super().__init__()
        if config.map_size > config.max_ctx_l:
            raise ValueError(f"map_size ({config.map_size}) must not exceed max_ctx_l ({config.max_ctx_l})")
        self.config = config
        d, heads, drop = config.hidden_size, config.n_heads, config.drop

        self.query_pos_embed = TrainablePositionalEncoding(config.max_desc_l, d, config.input_drop)
        self.clip_pos_embed = TrainablePositionalEncoding(config.max_ctx_l, d, config.input_drop)
        self.frame_pos_embed = TrainablePositionalEncoding(config.max_ctx_l, d, config.input_drop)

        self.query_input_proj = LinearLayer(config.query_dim, d, config.input_drop)
        self.query_encoder = BertAttention(d, heads, drop)

        self.clip_input_proj = LinearLayer(config.visual_dim, d, config.input_drop)
        self.clip_encoder = GMMBlock(d, heads, drop, config.gmm_widths)
        self.clip_encoder_2 = GMMBlock(d, heads, drop, config.gmm_widths)
        self.frame_input_proj = LinearLayer(config.visual_dim, d, config.input_drop)
        self.frame_encoder_1 = GMMBlock(d, heads, drop, config.gmm_widths)
        self.frame_encoder_2 = GMMBlock(d, heads, drop, config.gmm_widths)
        if config.use_mamba:
            self.clip_encoder_mamba = MambaUnit(config)
            self.clip_encoder_2_mamba = MambaUnit(config)
            self.frame_encoder_1_mamba = MambaUnit(config)
            self.frame_encoder_2_mamba = MambaUnit(config)

        self.modular_vector_mapping = nn.Linear(d, 1, bias=False)  # query pooling
        self.modular_vector_mapping_2 = nn.Linear(d, 1, bias=False)  # frame pooling
        if config.use_fusion:
            self.v2t_fusion = VisionLanguageFusionModule(d, heads)
            self.t2v_fusion = VisionLanguageFusionModule(d, heads)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------- building
    def reset_parameters(self) -> None:
        """Official global re-init (§9); it deliberately overwrites Mamba's own dt/projection init too."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> MamFusion:
        """A new model from a preset, e.g. `from_preset("tvr", visual_dim=1280, use_mamba=False)`."""
        return cls(load_preset(name, {f"model.{k}": v for k, v in overrides.items()}).model)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` (the MamFusionConfig) and `model.pt` (a plain state_dict)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        torch.save(self.state_dict(), out / WEIGHTS_FILE)

    @staticmethod
    def read_config(directory: str | Path) -> MamFusionConfig:
        """The config `save_pretrained` wrote, without building the model or reading its weights."""
        return MamFusionConfig.model_validate_json((Path(directory) / CONFIG_FILE).read_text())

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MamFusion:
        """Rebuild from `save_pretrained` output; weights load with `weights_only=True` (no unpickling)."""
        src = Path(directory)
        model = cls(cls.read_config(src))
        model.load_state_dict(torch.load(src / WEIGHTS_FILE, map_location=map_location, weights_only=True))
        return model

    # ----------------------------------------------------------------------------------------------- encoding
    def _mamba(self, name: str, x: Tensor) -> Tensor:
        return getattr(self, name)(x) if self.config.use_mamba else x

    def _check_length(self, length: int, limit: int, what: str) -> None:
        if length > limit:
            raise ValueError(
                f"{what} length {length} exceeds the positional table ({limit}); preprocess first"
            )

    def encode_queries(self, queries: QueryBatch) -> Tensor:
        """(B, N, Dq) token features -> (B, d) pooled query vectors (not normalised)."""
        self._check_length(queries.tokens.shape[1], self.config.max_desc_l, "query")
        x = self.query_pos_embed(self.query_input_proj(queries.tokens))
        x = self.query_encoder(x, queries.mask)
        return attention_pool(x, queries.mask, self.modular_vector_mapping)

    def encode_clips(self, clip_feats: Tensor) -> Tensor:
        """(B, n_clips, Dv) -> (B, n_clips, d); clips are never padded, so no mask."""
        self._check_length(clip_feats.shape[1], self.config.max_ctx_l, "clip")
        x = self.clip_pos_embed(self.clip_input_proj(clip_feats))
        x = self._mamba("clip_encoder_mamba", self.clip_encoder(x))
        return self._mamba("clip_encoder_2_mamba", self.clip_encoder_2(x))

    def encode_frames(self, frame_feats: Tensor, frame_mask: Tensor) -> Tensor:
        """(B, L, Dv) + mask -> (B, d) pooled video vectors. Gaussian scales follow the padded length L."""
        self._check_length(frame_feats.shape[1], self.config.max_ctx_l, "frame")
        x = self.frame_pos_embed(self.frame_input_proj(frame_feats))
        x = self._mamba("frame_encoder_1_mamba", self.frame_encoder_1(x, frame_mask))
        x = self._mamba("frame_encoder_2_mamba", self.frame_encoder_2(x, frame_mask))
        return attention_pool(x, frame_mask, self.modular_vector_mapping_2)

    def encode_videos(self, videos: VideoBatch) -> VideoEmbedding:
        """Both video views; independent of any query."""
        return VideoEmbedding(
            self.encode_clips(videos.clip_feats), self.encode_frames(videos.frame_feats, videos.frame_mask)
        )

    # ------------------------------------------------------------------------------------------------ scoring
    def score_with_moments(self, queries: Tensor, videos: VideoEmbedding) -> tuple[Tensor, Tensor]:
        """(B_q, B_v) retrieval scores and the index of each pair's best clip (the matching moment)."""
        q = F.normalize(queries, dim=-1)
        clip_cos, best_clip = max_clip_scores(q, F.normalize(videos.clips, dim=-1))
        video_cos = q @ F.normalize(videos.video, dim=-1).T
        return self.config.clip_scale_w * clip_cos + self.config.frame_scale_w * video_cos, best_clip

    def score(self, queries: Tensor, videos: VideoEmbedding) -> Tensor:
        """(B_q, B_v) = clip_scale_w * max-clip cosine + frame_scale_w * video cosine."""
        return self.score_with_moments(queries, videos)[0]

    # ----------------------------------------------------------------------------------------------- training
    def fuse_queries(self, queries: Tensor, videos: Tensor) -> Tensor:
        """Batch-level fusion for the QDL: videos attend over all queries, then queries over the fused videos.

        The official code first tiles the videos 4x; duplicating every key leaves softmax attention unchanged,
        so it is omitted.
        """
        fused_videos = self.v2t_fusion(videos, queries)
        return self.t2v_fusion(queries, fused_videos)

    def forward(
        self, videos: VideoBatch, queries: QueryBatch, query_labels: Tensor | Sequence[int]
    ) -> MamFusionOutput:
        """Training pass: cosine and raw scores at both levels, plus the queries for the query-diverse loss.

        `query_labels` (the index of each query's video) is accepted for interface symmetry with the loss; the
        scores do not depend on it. The QDL queries come from a second, independently dropped-out text pass.
        """
        del query_labels
        video = self.encode_videos(videos)
        q = self.encode_queries(queries)
        clip_raw, _ = max_clip_scores(q, video.clips)
        clip_cos, _ = max_clip_scores(F.normalize(q, dim=-1), F.normalize(video.clips, dim=-1))
        diverse = self.encode_queries(queries)
        if self.config.use_fusion:
            diverse = self.fuse_queries(diverse, video.video)
        return MamFusionOutput(
            clip_scores=clip_cos,
            clip_scores_raw=clip_raw,
            frame_scores=F.normalize(q, dim=-1) @ F.normalize(video.video, dim=-1).T,
            frame_scores_raw=q @ video.video.T,
            diverse_queries=diverse,
        )
