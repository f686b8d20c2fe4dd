"""Seeded synthetic demo corpus: real untrimmed video files plus captions of their events.

The demo trains MamFusion end to end on a CPU, so the corpus must be small, fast to decode and *learnable*
from ImageNet-CNN frame features and sentence embeddings. Each video is a sequence of 2–5 events; an event is
one coloured shape doing one motion on one plain background, and its caption names exactly those four things
("a red circle moves left on a blue background"). Backgrounds never repeat inside a video and every word of
the vocabulary always maps to the same pixels, so each caption is relevant to only part of its video (PRVR).

Determinism: the same config and seed give a byte-identical annotation file and manifest, and byte-identical
video files with the same PyAV/FFmpeg build. We encode MPEG-4 Part 2 (`mpeg4`) with one encoder thread:
libx264 in the av 18.1 wheel emits different bytes from run to run (slice sizes vary even with `threads=1`),
and multi-threaded `mpeg4` changes its bytes with the machine's core count. Stable bytes keep each video's
sha256 — the feature store's cache key — stable, so regenerating the corpus never forces re-extraction.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import av
import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from storage.errors import MamFusionError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST_NAME = "corpus.json"
ANNOTATIONS_NAME = "annotations.csv"
VIDEOS_DIRNAME = "videos"
CODEC = "mpeg4"
SPLITS = ("train", "val", "test")

# Strongly separated RGB colours; every colour word always renders as exactly this value.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (250, 140, 20),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "blinks")
# Frames between events belong to no caption; this grey is not in the colour vocabulary.
GAP_COLOUR = (128, 128, 128)
# A shape colour must be at least this far (RGB Euclidean) from its background to stay visible.
MIN_CONTRAST = 150.0
TEMPLATES = (
    "{a_colour} {colour} {shape} {motion} on {a_background} {background} background",
    "on {a_background} {background} background, {a_colour} {colour} {shape} {motion}",
    "{a_colour} {colour} {shape} {motion} in front of {a_background} {background} background",
)


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"train/val/test fractions must be non-negative and sum to 1, got {fractions}")
    return fractions


def check_min_max(config: BaseModel, *pairs: tuple[str, str]) -> None:
    """Raise, naming both fields, when a minimum exceeds its maximum."""
    for low, high in pairs:
        if getattr(config, low) > getattr(config, high):
            raise ValueError(f"{low} ({getattr(config, low)}) > {high} ({getattr(config, high)})")


SplitFractions = Annotated[tuple[float, float, float], AfterValidator(_check_fractions)]


class DemoCorpusError(MamFusionError, ValueError):
    """The output folder cannot take a demo corpus (a file, a folder of other files), or a size is invalid."""


class DemoCorpusConfig(BaseModel):
    """Size and look of the corpus; defaults keep the whole demo well under ten minutes on two cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_videos: int = Field(48, ge=1)
    seed: int = Field(0, ge=0)
    width: int = Field(160, ge=32, multiple_of=2, description="even: yuv420p needs it")
    height: int = Field(160, ge=32, multiple_of=2, description="square: the 224 centre crop keeps it all")
    fps: int = Field(10, ge=1, le=60)
    min_events: int = Field(2, ge=1)
    max_events: int = Field(5, ge=1, le=len(COLOURS))
    min_event_seconds: float = Field(2.5, gt=0)
    max_event_seconds: float = Field(5.0, gt=0)
    gap_probability: float = Field(0.3, ge=0.0, le=1.0, description="chance of an idle gap between events")
    max_gap_seconds: float = Field(1.5, ge=0.0)
    split_fractions: SplitFractions = (0.7, 0.15, 0.15)
    bit_rate: int = Field(800_000, gt=0)

    @model_validator(mode="after")
    def _check_ranges(self) -> DemoCorpusConfig:
        check_min_max(self, ("min_events", "max_events"), ("min_event_seconds", "max_event_seconds"))
        if self.min_event_seconds * self.fps < 1:
            raise ValueError(f"min_event_seconds ({self.min_event_seconds}) is < 1 frame at {self.fps} fps")
        return self


@dataclass(frozen=True)
class DemoEvent:
    """One captioned event: the frames [first_frame, first_frame + n_frames) of its video."""

    first_frame: int
    n_frames: int
    start: float
    end: float
    colour: str
    shape: str
    motion: str
    background: str
    caption: str


@dataclass(frozen=True)
class DemoVideo:
    video_id: str
    path: str
    split: str
    fps: int
    n_frames: int
    duration: float
    events: tuple[DemoEvent, ...]


@dataclass(frozen=True)
class DemoCorpus:
    out_dir: str
    videos_dir: str
    annotations_path: str
    manifest_path: str
    config: DemoCorpusConfig
    videos: tuple[DemoVideo, ...]

    @property
    def n_queries(self) -> int:
        return sum(len(v.events) for v in self.videos)

    def split_counts(self) -> dict[str, int]:
        return {s: sum(v.split == s for v in self.videos) for s in SPLITS}


def generate_demo_corpus(
    out_dir: str | os.PathLike, n_videos: int = 48, seed: int = 0, **overrides: object
) -> DemoCorpus:
    """Write `n_videos` videos under OUT/videos, OUT/annotations.csv (our csv format) and OUT/corpus.json.

    `overrides` are further `DemoCorpusConfig` fields. A folder holding an earlier demo corpus is regenerated
    in place (its videos are removed first); a file, or any other non-empty folder, is refused. An invalid
    size is a DemoCorpusError naming the field (pydantic's ValidationError, with its traceback, is the
    config class's own).
    """
    try:
        cfg = DemoCorpusConfig(n_videos=n_videos, seed=seed, **overrides)
    except ValidationError as exc:
        raise DemoCorpusError(f"invalid demo corpus settings: {_describe(exc)}") from None
    out = Path(out_dir).resolve()
    videos_dir = out / VIDEOS_DIRNAME
    _prepare_out_dir(out)
    videos_dir.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(cfg.n_videos, cfg.split_fractions, cfg.seed)
    videos = []
    for index in range(cfg.n_videos):
        video_id = f"demo{index:04d}"
        rng = np.random.default_rng([cfg.seed, index])
        events, n_frames = plan_events(rng, cfg)
        path = videos_dir / f"{video_id}.mp4"
        _encode_video(path, render_frames(events, n_frames, cfg, rng), cfg)
        duration = n_frames / cfg.fps
        split = splits[index]
        videos.append(DemoVideo(video_id, str(path), split, cfg.fps, n_frames, duration, tuple(events)))
    corpus = DemoCorpus(
        str(out), str(videos_dir), str(out / ANNOTATIONS_NAME), str(out / MANIFEST_NAME), cfg, tuple(videos)
    )
    _write_annotations(Path(corpus.annotations_path), corpus.videos)
    _write_manifest(Path(corpus.manifest_path), corpus)
    logger.info("demo corpus: %d videos, %d captions in %s", len(videos), corpus.n_queries, out)
    return corpus


def assign_splits(n_videos: int, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split by video (never by caption), seeded; val and test get at least one video once there are three."""
    wanted = [round(f * n_videos) for f in fractions[1:]]
    if n_videos >= 3:  # evaluation needs at least one video in every non-empty split
        wanted = [max(n, 1) if f else 0 for n, f in zip(wanted, fractions[1:], strict=True)]
    n_val = min(wanted[0], n_videos)
    n_test = min(wanted[1], n_videos - n_val)
    order = np.random.default_rng([seed, 2**31]).permutation(n_videos)
    splits = ["train"] * n_videos
    for i in order[:n_val]:
        splits[i] = "val"
    for i in order[n_val : n_val + n_test]:
        splits[i] = "test"
    return splits


def plan_events(rng: np.random.Generator, cfg: DemoCorpusConfig) -> tuple[list[DemoEvent], int]:
    """Choose the events of one video and lay them out in time; returns (events, total frame count)."""
    n_events = int(rng.integers(cfg.min_events, cfg.max_events + 1))
    backgrounds = rng.choice(list(COLOURS), size=n_events, replace=False)
    events, frame, previous_colour = [], 0, None
    for k, background in enumerate(backgrounds):
        if k and rng.random() < cfg.gap_probability:
            frame += int(rng.integers(1, max(1, round(cfg.max_gap_seconds * cfg.fps)) + 1))
        # A new colour at every cut, so neighbouring events differ in shape colour as well as background.
        visible = [c for c in COLOURS if _contrast(c, background) >= MIN_CONTRAST and c != previous_colour]
        colour = str(rng.choice(visible))
        shape, motion = str(rng.choice(SHAPES)), str(rng.choice(MOTIONS))
        seconds = rng.uniform(cfg.min_event_seconds, cfg.max_event_seconds)
        n_frames = max(1, round(seconds * cfg.fps))
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        caption = _caption(template, colour, shape, motion, str(background))
        start, end = round(frame / cfg.fps, 6), round((frame + n_frames) / cfg.fps, 6)  # as the csv says
        events.append(DemoEvent(frame, n_frames, start, end, colour, shape, motion, str(background), caption))
        frame += n_frames
        previous_colour = colour
    return events, frame


def render_frames(events: list[DemoEvent], n_frames: int, cfg: DemoCorpusConfig, rng: np.random.Generator):
    """Yield the video's RGB frames (H, W, 3) uint8; gap frames are plain grey."""
    yy, xx = np.mgrid[: cfg.height, : cfg.width].astype(np.float32)
    by_frame = {f: e for e in events for f in range(e.first_frame, e.first_frame + e.n_frames)}
    # Where the shape sits across its motion's axis, drawn once per event so the scene varies between videos.
    lanes = {e.first_frame: rng.uniform(0.35, 0.65) for e in events}
    for index in range(n_frames):
        frame = np.empty((cfg.height, cfg.width, 3), dtype=np.uint8)
        event = by_frame.get(index)
        if event is None:
            frame[:] = GAP_COLOUR
            yield frame
            continue
        frame[:] = COLOURS[event.background]
        progress = (index - event.first_frame + 0.5) / event.n_frames
        t = (index - event.first_frame) / cfg.fps
        cx, cy, radius, visible = _pose(event.motion, progress, t, lanes[event.first_frame])
        if visible:
            side = min(cfg.width, cfg.height)
            mask = _shape_mask(event.shape, xx - cx * cfg.width, yy - cy * cfg.height, radius * side)
            frame[mask] = COLOURS[event.colour]
        yield frame


def _pose(motion: str, progress: float, t: float, lane: float) -> tuple[float, float, float, bool]:
    """Centre (fractions of width, height), radius (fraction of the short side) and visibility."""
    travel = 0.2 + 0.6 * progress
    poses = {
        "moves left": (1.0 - travel, lane, 0.2),
        "moves right": (travel, lane, 0.2),
        "moves up": (lane, 1.0 - travel, 0.2),
        "moves down": (lane, travel, 0.2),
        "grows": (0.5, 0.5, 0.08 + 0.3 * progress),
        "shrinks": (0.5, 0.5, 0.38 - 0.3 * progress),
        "blinks": (0.5, 0.5, 0.25),
    }
    cx, cy, radius = poses[motion]
    visible = motion != "blinks" or int(t * 2) % 2 == 0  # on and off every half second
    return cx, cy, radius, visible


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base down
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def _caption(template: str, colour: str, shape: str, motion: str, background: str) -> str:
    def article(word: str) -> str:
        return "an" if word[0] in "aeiou" else "a"

    return template.format(
        a_colour=article(colour),
        colour=colour,
        shape=shape,
        motion=motion,
        a_background=article(background),
        background=background,
    )


def _contrast(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b])))


def _encode_video(path: Path, frames, cfg: DemoCorpusConfig) -> None:
    """Encode to a temporary name and rename, so an interrupted run never leaves a truncated .mp4 behind."""
    partial = path.with_name(path.name + ".part")
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=cfg.fps)
        stream.width, stream.height, stream.pix_fmt = cfg.width, cfg.height, "yuv420p"
        stream.codec_context.thread_count = 1  # the bytes must not depend on the machine's core count
        stream.codec_context.bit_rate = cfg.bit_rate
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    os.replace(partial, path)


def _describe(exc: ValidationError) -> str:
    """Every field pydantic refused, with its message, on one line."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())


def _prepare_out_dir(out: Path) -> None:
    """Accept a new/empty folder or an earlier demo corpus (removing its videos); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise DemoCorpusError(f"{out}: is a file, not a folder; pick a new or empty folder")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        for name in _manifest_video_files(manifest):
            (out / VIDEOS_DIRNAME / name).unlink(missing_ok=True)
        return
    if out.exists() and any(out.iterdir()):
        raise DemoCorpusError(f"{out}: not empty and holds no demo corpus ({MANIFEST_NAME}); pick another")


def _manifest_video_files(manifest: Path) -> list[str]:
    """File names of the videos an earlier corpus lists; a manifest we did not write is refused."""
    try:
        body = json.loads(manifest.read_bytes())
        names = [Path(video["file"]).name for video in body["videos"]]
        if body.get("generator") != "mamfusion.demo_corpus" or not all(names):
            raise ValueError("not ours")
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        raise DemoCorpusError(
            f"{manifest}: not a demo corpus manifest; pick another folder or remove the file"
        ) from None
    return names


def _write_annotations(path: Path, videos: tuple[DemoVideo, ...]) -> None:
    """Our csv format (CONTRACT.md): video_id,start,end,caption,split; query ids default to <id>#enc#<k>."""
    partial = path.with_name(path.name + ".part")
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["video_id", "start", "end", "caption", "split"])
        for video in videos:
            for e in video.events:
                writer.writerow([video.video_id, repr(e.start), repr(e.end), e.caption, video.split])
    os.replace(partial, path)


def _write_manifest(path: Path, corpus: DemoCorpus) -> None:
    """What was drawn for every event, so tests and users can check pixels against captions."""
    body = {
        "generator": "mamfusion.demo_corpus",
        "version": GENERATOR_VERSION,
        "codec": CODEC,
        "config": corpus.config.model_dump(mode="json"),
        "annotations": ANNOTATIONS_NAME,
        "videos": [
            {
                "video_id": v.video_id,
                "file": f"{VIDEOS_DIRNAME}/{Path(v.path).name}",
                "split": v.split,
                "fps": v.fps,
                "n_frames": v.n_frames,
                "duration": v.duration,
                "events": [asdict(e) for e in v.events],
            }
            for v in corpus.videos
        ],
    }
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)
