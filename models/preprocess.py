"""Input preprocessing of MODEL_SPEC §2 and §3.1, identical to the MS-SL / GMMFormer data loaders.

Videos become a fixed 32-clip view (window means over `clip_boundaries`) and a frame view downsampled to
at most `max_ctx_l` rows; every row is L2-normalised with eps 1e-5. Query token features are L2-normalised
per token and truncated to `max_desc_l`. Batches are zero-padded with 0/1 float masks. Numpy or torch in,
torch out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _as_float_tensor(x: ArrayLike) -> Tensor:
    """Accept numpy or torch rows; keep float64 inputs exact, cast everything else to float32."""
    t = torch.as_tensor(x)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def l2_normalize_rows(x: ArrayLike, eps: float = 1e-5) -> Tensor:
    """`x / (||x|| + eps)` per row: the official loaders add eps to the norm rather than clamping it."""
    t = _as_float_tensor(x)
    return t / (t.norm(dim=-1, keepdim=True) + eps)


def clip_boundaries(T: int, n: int) -> np.ndarray:
    """Window edges b_k = round(k*T/n), k = 0..n, clamped to T-1 (quirk: row T-1 never enters a mean).

    Computed as `arange(n+1) / n * T` in float64 with round-half-to-even, as the original does.
    """
    if T < 1 or n < 1:
        raise ValueError(f"clip_boundaries needs T >= 1 and n >= 1, got T={T}, n={n}")
    edges = np.round(np.arange(n + 1, dtype=np.float64) / n * T).astype(np.int64)
    return np.minimum(edges, T - 1)


def _window_rows(T: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row range [start, stop) each window reads: the window if non-empty, otherwise the single row b_k."""
    b = clip_boundaries(T, n)
    start = b[:-1]
    return start, np.maximum(b[1:], start + 1)


def _window_means(feats: Tensor, n: int) -> Tensor:
    """All window means at once from a float64 prefix sum (a loop of slices is slow for 512 windows)."""
    start, stop = (torch.from_numpy(a) for a in _window_rows(feats.shape[0], n))
    prefix = torch.cat([feats.new_zeros(1, feats.shape[1], dtype=torch.float64), feats.double().cumsum(0)])
    means = (prefix[stop] - prefix[start]) / (stop - start).unsqueeze(1)
    return means.to(feats.dtype)


def average_to_clips(feats: ArrayLike, n_clips: int = 32) -> Tensor:
    """(T, D) -> (n_clips, D) window means ("average_to_fixed_length"); rows repeat when T < n_clips."""
    return _window_means(_as_float_tensor(feats), n_clips)


def downsample_frames(feats: ArrayLike, max_len: int) -> Tensor:
    """(T, D) -> (min(T, max_len), D): unchanged if short enough, else window means (official name:
    "uniform_feature_sampling")."""
    t = _as_float_tensor(feats)
    return t if t.shape[0] <= max_len else _window_means(t, max_len)


def clip_spans(times: ArrayLike, n_clips: int = 32) -> Tensor:
    """(T, 2) row start/end seconds -> (n_clips, 2): the span of the rows each clip actually averages.

    Uses the same windows as `average_to_clips`, so a matched clip index maps to the moment that produced it
    (a clip that repeats a single row reports that row's span).
    """
    t = torch.as_tensor(times, dtype=torch.float64)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"times must have shape (T, 2), got {tuple(t.shape)}")
    start, stop = _window_rows(t.shape[0], n_clips)
    return torch.stack([t[torch.from_numpy(start), 0], t[torch.from_numpy(stop - 1), 1]], dim=1)


@dataclass
class VideoBatch:
    """Model-ready videos: 32-clip view, padded frame view and its 0/1 mask."""

    clip_feats: Tensor  # (B, n_clips, Dv)
    frame_feats: Tensor  # (B, L, Dv)
    frame_mask: Tensor  # (B, L) float, 1 = valid row

    def to(self, device: torch.device | str) -> VideoBatch:
        return VideoBatch(self.clip_feats.to(device), self.frame_feats.to(device), self.frame_mask.to(device))

    def __len__(self) -> int:
        return self.clip_feats.shape[0]


@dataclass
class QueryBatch:
    """Model-ready queries: padded token features and their 0/1 mask."""

    tokens: Tensor  # (B, N, Dq)
    mask: Tensor  # (B, N) float, 1 = valid token

    def to(self, device: torch.device | str) -> QueryBatch:
        return QueryBatch(self.tokens.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _pad(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad variable-length (L_i, D) float32 rows to the longest one, with a 0/1 float mask."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    longest = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), longest, rows[0].shape[1])
    mask = torch.zeros(len(rows), longest)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1.0
    return out, mask


def _check_rows(x: ArrayLike, index: int, what: str) -> Tensor:
    t = _as_float_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{what} {index}: expected a non-empty (T, D) array, got shape {tuple(t.shape)}")
    return t


def collate_videos(feats: Sequence[ArrayLike], n_clips: int, max_ctx_l: int) -> VideoBatch:
    """Per video: clip view = L2(average_to_clips), frame view = L2(downsample_frames); frames padded."""
    videos = [_check_rows(f, i, "video") for i, f in enumerate(feats)]
    clips = torch.stack([l2_normalize_rows(average_to_clips(v, n_clips)).float() for v in videos])
    frames, mask = _pad([l2_normalize_rows(downsample_frames(v, max_ctx_l)).float() for v in videos])
    return VideoBatch(clips, frames, mask)


def collate_queries(tokens: Sequence[ArrayLike], max_desc_l: int) -> QueryBatch:
    """Per query: L2-normalise each token, keep the first `max_desc_l`; then pad."""
    rows = [l2_normalize_rows(_check_rows(t, i, "query"))[:max_desc_l].float() for i, t in enumerate(tokens)]
    return QueryBatch(*_pad(rows))
