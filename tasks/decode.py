"""Sample frames of a video with decord at a fixed rate, in bounded chunks, ready for a visual backbone.

A video is cut into consecutive *windows* of `window_s` seconds; each window gets `frames_per_window` frames
at the centres of equal sub-intervals (1 frame per window = a frame rate of 1/window_s for 2D backbones; N
frames per window = one segment for a 3D backbone). Every window carries its start/end time in seconds from
the first frame.

Why this shape: frames are mapped to times through the container's per-frame timestamps (correct for variable
frame rate), decoded a chunk of windows at a time (memory does not grow with video length; decord's
`get_batch` on a whole long video is a known RAM blow-up), resized by the decoder itself (a 4K frame never
lands in Python; measured faster than decoding at source size and resizing in torch) and centre-cropped.
decord applies the container's rotation (display matrix) itself: frames come out upright and sizes are as
displayed (checked against PyAV + the matrix on rotated_90.mov in the tests). Samples past the last frame
repeat the last frame and are counted in `SamplingPlan.padded`. Anything decord cannot read, at open time or
part-way, becomes a `DecodeError` so callers can record the video as skipped and go on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import decord
import numpy as np

from storage.errors import MamFusionError


class DecodeError(MamFusionError):
    """A video that cannot be decoded (fully or part-way); `reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """What the sampler needs to know about a video; sizes are as displayed (decord applies rotation)."""

    path: str
    n_frames: int
    fps: float
    duration: float
    width: int
    height: int
    timestamps: Literal["container", "nominal"]  # where frame times come from


@dataclass(frozen=True)
class SamplingPlan:
    """Which frames each window uses and the time span each window covers."""

    indices: np.ndarray  # (W, F) int64 frame indices, clamped to the video
    times: np.ndarray  # (W, 2) float64 start/end seconds
    padded: int  # sample positions past the end of the video (filled with the last frame)


@dataclass(frozen=True)
class FrameChunk:
    """Consecutive windows of decoded frames, channels first: (w, F, 3, H, W) uint8."""

    frames: np.ndarray
    times: np.ndarray  # (w, 2)


def plan_windows(
    starts: np.ndarray, duration: float, window_s: float, frames_per_window: int
) -> SamplingPlan:
    """Sample times at sub-interval centres, mapped to the frame on screen at that time (VFR-safe)."""
    if window_s <= 0 or frames_per_window < 1:
        raise ValueError(
            f"window_s must be > 0 and frames_per_window >= 1, got {window_s}, {frames_per_window}"
        )
    n_windows = max(1, math.ceil(duration / window_s - 1e-6))
    offsets = (np.arange(frames_per_window) + 0.5) * (window_s / frames_per_window)
    window_starts = np.arange(n_windows) * window_s
    sample_times = window_starts[:, None] + offsets[None, :]
    indices = np.searchsorted(starts, sample_times, side="right") - 1
    indices = np.clip(indices, 0, len(starts) - 1).astype(np.int64)
    ends = np.minimum(window_starts + window_s, duration)
    times = np.stack([window_starts, ends], axis=1).astype(np.float64)
    return SamplingPlan(indices=indices, times=times, padded=int((sample_times >= duration).sum()))


def _frame_starts(reader: decord.VideoReader, fps: float) -> tuple[np.ndarray, str]:
    """Per-frame start times from the container, or i/fps when the container's are unusable (e.g. AVI)."""
    n = len(reader)
    stamps = np.asarray(reader.get_frame_timestamp(list(range(n))), dtype=np.float64)[:, 0]
    if np.all(np.isfinite(stamps)) and stamps[0] >= -1e-3 and np.all(np.diff(stamps) >= 0):
        return stamps - stamps[0], "container"
    return np.arange(n) / fps, "nominal"


def _decode_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Decoder output (width, height) with the short side scaled to `short_side`, aspect kept."""
    if short_side is None:
        return width, height
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


class VideoStream:
    """An opened video with its sampling plan; `chunks()` decodes it a few windows at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        window_s: float,
        frames_per_window: int,
        short_side: int | None = 256,
        crop: int | None = 224,
        num_threads: int = 1,
    ) -> None:
        self.path = str(path)
        self.crop = crop
        self.frames_decoded = 0
        try:
            probe = decord.VideoReader(self.path, num_threads=1)
            height, width = probe[0].shape[:2]
            n, fps = len(probe), float(probe.get_avg_fps())
            if n == 0 or not math.isfinite(fps) or fps <= 0:
                raise DecodeError(self.path, f"no usable video stream ({n} frames, {fps} fps)")
            starts, source = _frame_starts(probe, fps)
            del probe
            size = _decode_size(width, height, short_side)
            self._reader = decord.VideoReader(
                self.path, width=size[0], height=size[1], num_threads=num_threads
            )
        except (decord.DECORDError, RuntimeError) as err:  # decord raises RuntimeError for non-videos
            raise DecodeError(self.path, f"cannot open: {_first_line(err)}") from err
        duration = float(starts[-1] + 1.0 / fps)
        self.info = VideoInfo(self.path, n, fps, duration, width, height, source)
        self.plan = plan_windows(starts, duration, window_s, frames_per_window)

    def chunks(self, chunk_windows: int = 16) -> Iterator[FrameChunk]:
        """Decode `chunk_windows` windows at a time (each distinct frame once), in time order."""
        n_windows = len(self.plan.indices)
        for first in range(0, n_windows, chunk_windows):
            wanted = self.plan.indices[first : first + chunk_windows]
            frames = self._decode(wanted)
            yield FrameChunk(frames=frames, times=self.plan.times[first : first + chunk_windows])

    def _decode(self, wanted: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(wanted, return_inverse=True)
        try:
            batch = self._reader.get_batch(unique.tolist()).asnumpy()  # (u, H, W, 3); bridge-independent
        except decord.DECORDError as err:
            span = f"{unique[0]}..{unique[-1]}"
            raise DecodeError(self.path, f"decoding frames {span} failed: {_first_line(err)}") from err
        self.frames_decoded += len(unique)
        frames = _center_crop(batch, self.crop)[inverse.reshape(wanted.shape)]  # (w, F, H, W, 3)
        return np.ascontiguousarray(frames.transpose(0, 1, 4, 2, 3))


def _center_crop(batch: np.ndarray, crop: int | None) -> np.ndarray:
    if crop is None:
        return batch
    height, width = batch.shape[1:3]
    top, left = (height - crop) // 2, (width - crop) // 2
    return batch[:, top : top + crop, left : left + crop]


_SOURCE_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _first_line(err: BaseException) -> str:
    """decord messages carry `[time] file.cc:line:` prefixes and C++ stack traces; keep the reason only."""
    lines = [_SOURCE_PREFIX.sub("", ln).strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Stack trace")]
    return lines[0][:300] if lines else type(err).__name__
