"""Loading the official MamFusion checkpoints (`official_checkpoint_keys.tsv`) into our model.

Our module names equal the official ones, so the mapping is the identity except for the two dead
`Conv2d(5 -> 15680)` layers of the fusion modules, which our model does not carry (188,160 parameters
never used in any forward pass); they are dropped with a logged note. Files load with `weights_only=True`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from models.mamfusion import MamFusion
from storage.errors import MamFusionError

logger = logging.getLogger(__name__)

DEAD_PREFIXES = ("v2t_fusion.vid_embed_proj.", "t2v_fusion.vid_embed_proj.")


class CheckpointError(MamFusionError, ValueError):
    """An official checkpoint does not match the model; the message names the offending keys."""


def official_key_to_ours(key: str) -> str | None:
    """Our parameter name for an official state_dict key, or None for a weight we deliberately drop."""
    return None if key.startswith(DEAD_PREFIXES) else key


def _read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A state_dict, or the `state_dict` entry of an official `.ckpt`, read without unpickling objects."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # the official .ckpt pickles an EasyDict config next to the weights
            raise CheckpointError(
                f"{path}: cannot be read with weights_only=True ({type(exc).__name__}: {exc}); "
                "re-save only its 'state_dict' entry with torch.save in a trusted environment"
            ) from None
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return state


def load_official_checkpoint(model: MamFusion, source: str | os.PathLike | Mapping[str, Tensor]) -> None:
    """Copy an official state_dict into `model`; every model tensor must be covered, with matching shapes."""
    state = _read_state_dict(source)
    mapped: dict[str, Tensor] = {}
    dropped = []
    for key, value in state.items():
        ours = official_key_to_ours(key)
        if ours is None:
            dropped.append(key)
        else:
            mapped[ours] = value
    if dropped:
        logger.info(
            "dropped %d unused official tensors (dead fusion Conv2d): %s", len(dropped), ", ".join(dropped)
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    wrong_shape = [
        f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"official checkpoint does not fit the model: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {wrong_shape}"
        )
    model.load_state_dict(mapped)
