"""Typed experiment configuration and the per-dataset presets of MODEL_SPEC §7.

`MamFusionConfig` is everything the network and its losses need; `TrainConfig` is the optimisation recipe.
`ExperimentConfig` pairs them. Presets reproduce the official yaml files exactly; `demo` is ours, sized for
the bundled demo corpus on a CPU with the `lite` feature profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import MamFusionError


class ConfigError(MamFusionError, ValueError):
    """A configuration value is invalid; the message names the field and the reason."""


class _Strict(BaseModel):
    # NaN/inf are never a meaningful hyper-parameter: lr=inf trained a model whose every weight was NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class MamFusionConfig(_Strict):
    """Architecture and loss settings (official names in comments where they differ)."""

    visual_dim: int = Field(1024, gt=0, le=1 << 20, description="Dv, per-row visual feature size")
    query_dim: int = Field(1024, gt=0, le=1 << 20, description="Dq, per-token text feature size")
    hidden_size: int = Field(384, gt=0, le=1 << 16)
    n_heads: int = Field(8, gt=0, le=1024)
    input_drop: float = Field(0.2, ge=0.0, lt=1.0)
    drop: float = Field(0.18, ge=0.0, lt=1.0)
    max_desc_l: int = Field(30, gt=0, le=1 << 16, description="query tokens kept")
    max_ctx_l: int = Field(256, gt=0, le=1 << 20, description="frame-branch length after downsampling")
    map_size: int = Field(32, gt=0, le=1 << 12, description="number of clips")
    initializer_range: float = Field(0.02, gt=0.0)
    # None = the attention block without a Gaussian (variance infinity).
    gmm_widths: tuple[float | None, ...] = (None, 0.5, 1.0, 5.0)
    clip_scale_w: float = Field(0.7, ge=0.0)
    frame_scale_w: float = Field(0.3, ge=0.0)
    margin: float = Field(0.2, ge=0.0)
    loss_factor: tuple[float, float, float] = (0.027, 0.045, 0.015)
    neg_factor: tuple[float, float] = (0.2, 32.0)
    hard_pool_size: int = Field(20, gt=0)
    use_mamba: bool = True
    use_fusion: bool = True
    mamba_d_state: int = Field(16, gt=0)
    mamba_d_conv: int = Field(4, gt=0)
    mamba_expand: int = Field(2, gt=0)
    mamba_impl: Literal["auto", "torch", "compiled", "cuda"] = "auto"

    def model_post_init(self, __context: Any) -> None:
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})"
            )
        for w in self.gmm_widths:
            if w is not None and (not math.isfinite(w) or w <= 0):
                raise ValueError(f"gmm_widths entries must be positive or null, got {w}")


class TrainConfig(_Strict):
    """Optimisation recipe (BertAdam + warmup-linear, MODEL_SPEC §8)."""

    batch_size: int = Field(64, gt=0, le=1 << 16, description="videos per batch")
    lr: float = Field(4.5e-4, gt=0.0, le=1.0, description="peak learning rate (BertAdam)")
    warmup_proportion: float = Field(0.01, gt=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    n_epoch: int = Field(200, gt=0, le=100_000)
    max_es_cnt: int = Field(200, gt=0, description="early-stopping patience in epochs")
    hard_negative_start_epoch: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0.0, description="per-tensor max norm")
    eval_query_bsz: int = Field(50, gt=0, le=1 << 16)
    eval_context_bsz: int = Field(100, gt=0, le=1 << 16)
    eval_gallery: Literal["auto", "split", "extended"] = Field(
        "auto",
        description="validation/test gallery: the split's videos, or plus other splits' videos as "
        "distractors; auto extends galleries under 100 videos except on benchmark (MS-SL) data",
    )
    seed: int = Field(9527, ge=0, lt=1 << 63)
    num_workers: int = Field(28, ge=0, le=1024, description="data-loader workers (capped at the CPU count)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "on", "off"] = "auto"


class ExperimentConfig(_Strict):
    """A named recipe: the model plus how to train it."""

    name: str = "custom"
    model: MamFusionConfig = MamFusionConfig()
    train: TrainConfig = TrainConfig()

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
        """Load a YAML file; it may start from a preset (`preset: tvr`) and override fields."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        base = data.pop("preset", None)
        flat = _flatten(data)
        flat.update(overrides or {})
        return load_preset(base, flat) if base else _build({}, flat)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_ACTIVITYNET = dict(
    model=dict(
        visual_dim=1024,
        query_dim=1024,
        n_heads=8,
        input_drop=0.2,
        drop=0.18,
        max_ctx_l=256,
        loss_factor=(0.027, 0.045, 0.015),
        neg_factor=(0.2, 32.0),
    ),
    train=dict(
        batch_size=64,
        lr=4.5e-4,
        n_epoch=200,
        max_es_cnt=200,
        hard_negative_start_epoch=20,
        num_workers=28,
    ),
)
_CHARADES = dict(
    model=dict(
        visual_dim=1024,
        query_dim=1024,
        n_heads=4,
        input_drop=0.15,
        drop=0.3,
        max_ctx_l=1024,
        loss_factor=(0.008, 0.01, 0.005),
        neg_factor=(0.15, 32.0),
    ),
    train=dict(
        batch_size=64,
        lr=3.8e-4,
        n_epoch=400,
        max_es_cnt=10,
        hard_negative_start_epoch=100,
        num_workers=48,
    ),
)
_TVR = dict(
    model=dict(
        visual_dim=3072,
        query_dim=768,
        n_heads=8,
        input_drop=0.2,
        drop=0.45,
        max_ctx_l=512,
        loss_factor=(0.027, 0.045, 0.015),
        neg_factor=(0.2, 32.0),
    ),
    train=dict(
        batch_size=256,
        lr=4.5e-4,
        n_epoch=200,
        max_es_cnt=200,
        hard_negative_start_epoch=20,
        num_workers=28,
    ),
)
# Ours: the `lite` profile (EfficientNet-Lite0 1280-d frames, MiniLM 384-d tokens) on the demo corpus, CPU.
# lr 5e-5, not the official 4.5e-4: these features share a large common direction (mean pairwise cosine
# ~0.5 between rows) and a demo run has only ~6 steps per epoch (warmup ~2 steps, inside BertAdam's
# no-bias-correction phase), so at 4.5e-4 the first updates add one shared vector to every embedding and the
# model collapses to a constant output within epoch 1 (train R@1 at chance). At 5e-5 on the 120-video demo
# corpus: train R@1 67%, test R@1 73% (was 2.3% / 7.9%).
_DEMO = dict(
    model=dict(
        visual_dim=1280,
        query_dim=384,
        n_heads=4,
        input_drop=0.1,
        drop=0.1,
        max_ctx_l=128,
        loss_factor=(0.027, 0.045, 0.015),
        neg_factor=(0.2, 32.0),
    ),
    train=dict(
        batch_size=16,
        lr=5e-5,
        n_epoch=30,
        max_es_cnt=10,
        hard_negative_start_epoch=10,
        num_workers=0,
    ),
)

PRESETS: dict[str, dict[str, Any]] = {
    "activitynet": _ACTIVITYNET,
    "charades": _CHARADES,
    "tvr": _TVR,
    "demo": _DEMO,
}
PRESET_ALIASES = {"act": "activitynet", "cha": "charades"}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def load_preset(name: str, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Build a preset by name, applying overrides given as `section.field` or unique bare field names."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    base = {section: dict(values) for section, values in PRESETS[key].items()}
    return _build(base | {"name": key}, dict(overrides or {}))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings; values are YAML scalars (`lr=1e-4`, `use_mamba=false`)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = _scalar(v)
    return out


def _scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


_SECTIONS = {"model": MamFusionConfig, "train": TrainConfig}


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k in _SECTIONS and isinstance(v, Mapping):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def _resolve(key: str) -> tuple[str, str]:
    if key == "name":
        return "", "name"
    if "." in key:
        section, field = key.split(".", 1)
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r} (sections: model, train)")
        if field not in _SECTIONS[section].model_fields:
            raise ConfigError(f"unknown field {key!r}")
        return section, field
    owners = [s for s, cls in _SECTIONS.items() if key in cls.model_fields]
    if not owners:
        raise ConfigError(f"unknown config field {key!r}")
    return owners[0], key


def _build(base: dict[str, Any], overrides: Mapping[str, Any]) -> ExperimentConfig:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        section, field = _resolve(key)
        if section:
            data.setdefault(section, {})[field] = value
        else:
            data[field] = value
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(parts)
