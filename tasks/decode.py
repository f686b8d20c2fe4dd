"""Sample frames of a video with decord at a fixed rate, in bounded chunks, ready for a visual backbone.

A video is cut into consecutive *windows* of `window_s` seconds; each window gets `frames_per_window` frames
at the centres of equal sub-intervals (1 frame per window = a frame rate of 1/window_s for 2D backbones; N
frames per window = one segment for a 3D backbone). Every window carries its start/end time in seconds from
the first frame.

Never faster than the file: when the profile asks for more frames per second than the video has
(`frames_per_window / window_s > fps`, e.g. a 1-fps clip under the lite profile's 0.5 s windows), windows are
stretched to `frames_per_window / fps` seconds, so every row holds distinct frames (a 1-fps clip gives one
1 s row per frame) instead of the same frame repeated over several rows. `SamplingPlan.window_s` is the length
used and `SamplingPlan.native_rate` says it was stretched; the extractor notes it once per video. The last
window ends at the video's duration; a trailing window within the precision of decord's float32 timestamps
(a 31 s video is 31.0000005 s long: at 0.5 s windows it ended with a row [31.0, 31.0000005]) is merged into
the one before it, so no row is empty or shorter than that precision. Real tails, however short (4 ms of the
last frame of a 4.004 s NTSC clip), keep their row.

Why this shape: frames are mapped to times through the container's per-frame timestamps (correct for variable
frame rate; `storage.catalog.read_frame_times`, the one definition the catalog uses too, falls back to i/fps
for AVIs without timestamps), decoded a chunk of windows at a time (memory does not grow with video length;
decord's `get_batch` on a whole long video is a known RAM blow-up), resized by the decoder itself (a 4K frame
never lands in Python; measured faster than decoding at source size and resizing in torch) and centre-cropped.
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

import decord
import numpy as np

from storage.catalog import TimestampSource, clean_reason, read_frame_times, stream_problem
from storage.errors import MamFusionError


class DecodeError(MamFusionError):
    """A video that cannot be decoded (fully or part-way); `reason` (one printable line) says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        reason = clean_reason(reason)
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
    timestamps: TimestampSource  # where frame times come from


@dataclass(frozen=True)
class SamplingPlan:
    """Which frames each window uses and the time span each window covers."""

    indices: np.ndarray  # (W, F) int64 frame indices, clamped to the video
    times: np.ndarray  # (W, 2) float64 start/end seconds
    padded: int  # sample positions past the end of the video (filled with the last frame)
    window_s: float  # window length used: the requested one, or longer for a low frame rate
    native_rate: bool = False  # window_s was stretched to sample at the video's own frame rate


@dataclass(frozen=True)
class FrameChunk:
    """Consecutive windows of decoded frames, channels first: (w, F, 3, H, W) uint8."""

    frames: np.ndarray
    times: np.ndarray  # (w, 2)


def plan_windows(
    starts: np.ndarray,
    duration: float,
    window_s: float,
    frames_per_window: int,
    fps: float | None = None,
) -> SamplingPlan:
    """Sample times at sub-interval centres, mapped to the frame on screen at that time (VFR-safe).

    With `fps`, windows stretch to `frames_per_window / fps` when that is longer than `window_s` (never
    sample faster than the video). A trailing window within float32 timestamp precision joins the one before.
    """
    if window_s <= 0 or frames_per_window < 1:
        raise ValueError(
            f"window_s must be > 0 and frames_per_window >= 1, got {window_s}, {frames_per_window}"
        )
    if not duration > 0 or len(starts) == 0:
        raise ValueError(f"need at least one frame and a positive duration, got {len(starts)}, {duration}")
    native = fps is not None and frames_per_window / fps > window_s
    window = frames_per_window / fps if native and fps is not None else window_s
    n_windows = max(1, math.ceil(duration / window - 1e-9))
    if n_windows > 1 and duration - (n_windows - 1) * window <= timestamp_precision(duration):
        n_windows -= 1  # a sliver past the last full window: timestamp rounding, not content
    offsets = (np.arange(frames_per_window) + 0.5) * (window / frames_per_window)
    window_starts = np.arange(n_windows) * window
    sample_times = window_starts[:, None] + offsets[None, :]
    indices = np.searchsorted(starts, sample_times, side="right") - 1
    indices = np.clip(indices, 0, len(starts) - 1).astype(np.int64)
    ends = np.minimum(window_starts + window, duration)
    ends[-1] = duration  # the last row covers the video to its end
    times = np.stack([window_starts, ends], axis=1).astype(np.float64)
    padded = int((sample_times >= duration).sum())
    return SamplingPlan(indices, times, padded, float(window), bool(native))


def timestamp_precision(seconds: float) -> float:
    """How far a time near `seconds` may be off after float32 (decord's stamps), with a margin of 4."""
    return max(1e-6, 4.0 * float(np.spacing(np.float32(seconds))))


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
            n, fps = len(probe), float(probe.get_avg_fps())
            problem = stream_problem(n, fps)
            if problem:
                raise DecodeError(self.path, problem)
            height, width = probe[0].shape[:2]
            frame_times = read_frame_times(probe)
            del probe
            size = _decode_size(width, height, short_side)
            self._reader = decord.VideoReader(
                self.path, width=size[0], height=size[1], num_threads=num_threads
            )
        except (decord.DECORDError, RuntimeError) as err:  # decord raises RuntimeError for non-videos
            raise DecodeError(self.path, f"cannot open: {_first_line(err)}") from err
        duration = frame_times.duration
        self.info = VideoInfo(self.path, n, fps, duration, width, height, frame_times.source)
        self.plan = plan_windows(frame_times.starts, duration, window_s, frames_per_window, fps)

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
