"""Which torch device a step runs on: one rule for extraction and training."""

from __future__ import annotations

import torch

from models.config import ConfigError


def resolve_device(device: str, field: str = "device") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}=cuda but CUDA is not available (use {field}=auto or cpu)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
