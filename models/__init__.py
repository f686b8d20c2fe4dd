"""Pure-PyTorch model code: MamFusion, its preprocessing, losses, optimiser and checkpoint loading.

Names are imported lazily (PEP 562) so that `import models.config` (the CLI, config validation) does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BertAdam": "models.optim",
    "param_groups": "models.optim",
    "warmup_linear": "models.optim",
    "MamFusion": "models.mamfusion",
    "MamFusionOutput": "models.mamfusion",
    "VideoEmbedding": "models.mamfusion",
    "MamFusionLoss": "models.losses",
    "QueryBatch": "models.preprocess",
    "VideoBatch": "models.preprocess",
    "collate_queries": "models.preprocess",
    "collate_videos": "models.preprocess",
    "load_official_checkpoint": "models.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
