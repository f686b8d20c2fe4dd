"""Feature extraction into the FeatureStore: videos → visual rows, caption texts → token features.

Cache key = (video sha256 | text, extractor fingerprint): work already in the store is skipped before anything
is decoded or any model is loaded (models load lazily, on the first video that needs them). Decoding the next
chunk runs in a prefetch thread while the backbone works on the current one (decord and torch both release the
GIL). Videos that cannot be decoded are returned as skipped with the reason (one printable line: decoder logs
carry NULs); everything else that fails raises (so an orchestrator can retry transient errors). A video whose
frame rate is below the profile's sampling rate is sampled at its own rate (see `tasks.decode`): its outcome
carries a `note` saying so, and its stored attrs the `window_s` used. `VisualExtractor.stats` counts decoding
and inference so callers and tests can see that a cached run did none.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from models.backbones import WindowEncoder, build_backbone
from models.text_backbones import TextEncoder
from storage.catalog import VideoRecord, clean_reason, sha256_file
from storage.feature_store import FeatureStore, MissingFeatureError
from tasks.decode import DecodeError, FrameChunk, VideoStream
from tasks.device import resolve_device
from tasks.profiles import (
    FeatureProfile,
    VisualExtractorConfig,
    build_text_encoder,
    text_encoder_from_info,
    text_fingerprint,
    visual_fingerprint,
    visual_identity,
    visual_precision,
)

__all__ = [
    "ExtractOutcome",
    "ExtractStats",
    "ExtractSummary",
    "QuerySummary",
    "TextEncoder",
    "VisualExtractor",
    "extract_queries",
    "extract_video",
    "extract_videos",
    "stored_outcomes",
    "text_encoder_from_info",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
QUERY_WRITE_BATCH = 512  # texts encoded and committed together (bounds memory on 17k-sentence files)
_TEXT_KEYS = {"model", "weights", "layer"}  # enough for text_encoder_from_info; batch size/device are runtime


@dataclass
class ExtractStats:
    """Work actually done (not skipped): what "a second run does nothing" is asserted on."""

    videos_decoded: int = 0
    frames_decoded: int = 0
    windows_encoded: int = 0


class VisualExtractor:
    """A visual config made runnable: the fingerprint at once, the backbones on first use (thread-safe)."""

    def __init__(self, cfg: VisualExtractorConfig) -> None:
        self.cfg = cfg
        self.fingerprint = visual_fingerprint(cfg)
        self.dim = cfg.dim
        self.device = resolve_device(cfg.device)
        self.stats = ExtractStats()
        self._encoder: WindowEncoder | None = None
        self._lock = threading.Lock()
        self._registered: set[str] = set()

    def __reduce__(self) -> tuple[type[VisualExtractor], tuple[VisualExtractorConfig]]:
        """Pickle as the config (Dask/process workers rebuild the backbones themselves)."""
        return VisualExtractor, (self.cfg,)

    def register(self, store: FeatureStore) -> None:
        """Make the fingerprint known to the store once (the first registration's config is kept)."""
        with self._lock:
            if store.url in self._registered:
                return
            _register_once(store, self.fingerprint, "visual", self.dim, visual_identity(self.cfg))
            self._registered.add(store.url)

    @property
    def encoder(self) -> WindowEncoder:
        with self._lock:
            if self._encoder is None:
                backbones = [
                    build_backbone(
                        b.name, b.weights, crop=self.cfg.crop, channels_last=self.cfg.channels_last
                    )
                    for b in self.cfg.backbones
                ]
                strides = [b.frame_stride for b in self.cfg.backbones]
                self._encoder = WindowEncoder(backbones, strides).to(self.device).eval()
            return self._encoder

    def extract(self, path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(features (W, dim) float32, times (W, 2) seconds, attrs) of a video; DecodeError if unreadable."""
        cfg = self.cfg
        stream = VideoStream(
            path,
            window_s=cfg.window_s,
            frames_per_window=cfg.frames_per_window,
            short_side=cfg.short_side,
            crop=cfg.crop,
            num_threads=cfg.decode_threads,
        )
        chunks = stream.chunks(cfg.chunk_windows)
        if cfg.prefetch_chunks:
            chunks = _prefetch(chunks, cfg.prefetch_chunks)
        features = np.concatenate([self._encode(chunk) for chunk in chunks])
        with self._lock:
            self.stats.videos_decoded += 1
            self.stats.frames_decoded += stream.frames_decoded
            self.stats.windows_encoded += len(features)
        info = stream.info
        attrs = {
            "duration": info.duration,
            "source_fps": info.fps,
            "source_frames": info.n_frames,
            "width": info.width,
            "height": info.height,
            "timestamps": info.timestamps,
            "padded_frames": stream.plan.padded,
            "window_s": stream.plan.window_s,
            "native_rate": stream.plan.native_rate,
        }
        return features, stream.plan.times, attrs

    def _encode(self, chunk: FrameChunk) -> np.ndarray:
        encoder, out = self.encoder, []
        autocast = (
            torch.autocast("cuda", dtype=torch.float16)
            if visual_precision(self.cfg) == "fp16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            for start in range(0, len(chunk.frames), self.cfg.batch_windows):
                batch = torch.from_numpy(chunk.frames[start : start + self.cfg.batch_windows])
                out.append(encoder(batch.to(self.device, non_blocking=True)).cpu().numpy())
        return np.concatenate(out)


def native_rate_note(fps: float, window_s: float, frames_per_window: int, used_s: float) -> str:
    """The one line a run reports for a video sampled at its own, lower, frame rate."""
    rate = frames_per_window / window_s
    return (
        f"{fps:g} fps is below the profile's {rate:g} frames/s: sampled every frame once, "
        f"rows of {used_s:g} s instead of {window_s:g} s"
    )


@dataclass(frozen=True)
class ExtractOutcome:
    video_id: str
    path: str
    status: Literal["extracted", "cached", "skipped"]
    reason: str | None = None
    note: str | None = None  # something a run should report about a video that was extracted


@dataclass
class ExtractSummary:
    fingerprint: str
    extracted: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    stats: ExtractStats = field(default_factory=ExtractStats)
    notes: list[dict[str, str]] = field(default_factory=list)  # {"path", "note"}

    def add(self, outcome: ExtractOutcome) -> None:
        if outcome.status == "skipped":
            self.skipped.append({"path": outcome.path, "reason": outcome.reason or "unknown"})
        else:
            getattr(self, outcome.status).append(outcome.video_id)
        if outcome.note:
            self.notes.append({"path": outcome.path, "note": outcome.note})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract_video(
    record: VideoRecord, extractor: VisualExtractor, store: FeatureStore, fingerprint: str | None = None
) -> ExtractOutcome:
    """Extract one catalogued video unless the store has it; a given `fingerprint` must be the extractor's."""
    if fingerprint is not None and fingerprint != extractor.fingerprint:
        raise ValueError(f"fingerprint {fingerprint} does not match the extractor's {extractor.fingerprint}")
    if record.error is not None:  # a catalog written before reasons were cleaned may hold NULs
        return ExtractOutcome(record.video_id, record.path, "skipped", clean_reason(record.error))
    sha = record.sha256 or sha256_file(record.path)
    if store.has_video(sha, extractor.fingerprint):  # its note, if any, was given when it was extracted
        return ExtractOutcome(record.video_id, record.path, "cached")
    try:
        features, times, attrs = extractor.extract(record.path)
    except DecodeError as err:
        log.warning("skipping %s: %s", record.path, err.reason)
        return ExtractOutcome(record.video_id, record.path, "skipped", err.reason)
    extractor.register(store)
    store.write_video(sha, extractor.fingerprint, features, times, video_id=record.video_id, attrs=attrs)
    note = _note(attrs, extractor.cfg)
    if note:
        log.info("%s: %s", record.path, note)
    return ExtractOutcome(record.video_id, record.path, "extracted", note=note)


def stored_outcomes(
    records: Sequence[VideoRecord], cfg: VisualExtractorConfig, store: FeatureStore
) -> list[ExtractOutcome | None]:
    """Per record, its "cached" outcome if the store already holds its features under `cfg`'s fingerprint
    (one concurrent read for all), else None: a flow submits extraction only for the None ones, so a re-run
    of an unchanged folder costs no per-video task. Unlike `extract_video`, a cached outcome repeats the
    entry's note: a pipeline run lists every video its model uses with a caveat. Records without a sha256
    or with an error are left to `extract_video`, which hashes or skips them."""
    fingerprint = visual_fingerprint(cfg)
    known = [i for i, r in enumerate(records) if r.error is None and r.sha256]
    found = store.stored_video_attrs(fingerprint, [records[i].sha256 or "" for i in known])
    outcomes: list[ExtractOutcome | None] = [None] * len(records)
    for i, attrs in zip(known, found, strict=True):
        if attrs is not None:
            record = records[i]
            outcomes[i] = ExtractOutcome(record.video_id, record.path, "cached", note=_note(attrs, cfg))
    return outcomes


def _note(attrs: dict[str, Any], cfg: VisualExtractorConfig) -> str | None:
    """What a run reports about a video's sampling, from the attrs stored with it."""
    if not attrs.get("native_rate"):
        return None
    return native_rate_note(attrs["source_fps"], cfg.window_s, cfg.frames_per_window, attrs["window_s"])


def extract_videos(
    records: Sequence[VideoRecord], profile: FeatureProfile, store: FeatureStore, *, progress: bool = False
) -> ExtractSummary:
    """Every record through the profile's visual extractor, one after another (fan-out is the flow's job)."""
    extractor = VisualExtractor(profile.visual)
    summary = ExtractSummary(extractor.fingerprint, stats=extractor.stats)
    for record in tqdm(records, desc="extract", unit="video", disable=not progress, file=sys.stderr):
        summary.add(extract_video(record, extractor, store))
    log.info(
        "visual %s: %d extracted, %d cached, %d skipped",
        extractor.fingerprint,
        len(summary.extracted),
        len(summary.cached),
        len(summary.skipped),
    )
    return summary


@dataclass
class QuerySummary:
    fingerprint: str
    encoded: int = 0
    cached: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"text", "reason"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract_queries(
    texts: Sequence[str], profile: FeatureProfile, store: FeatureStore, *, progress: bool = False
) -> QuerySummary:
    """Token features for every distinct text not yet in the store; blank texts are skipped with a reason."""
    fingerprint = text_fingerprint(profile.text)
    summary = QuerySummary(fingerprint)
    distinct = list(dict.fromkeys(texts))
    valid = [t for t in distinct if isinstance(t, str) and t.strip()]
    summary.skipped = [
        {"text": str(t), "reason": "blank text has no tokens"} for t in distinct if t not in valid
    ]
    todo = [t for t, have in zip(valid, store.has_queries(fingerprint, valid), strict=True) if not have]
    summary.cached = len(valid) - len(todo)
    if todo:
        encoder = build_text_encoder(profile.text)
        _register_once(store, fingerprint, "text", encoder.dim, profile.text.model_dump(include=_TEXT_KEYS))
        with tqdm(total=len(todo), desc="queries", unit="text", disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(todo), QUERY_WRITE_BATCH):
                batch = todo[start : start + QUERY_WRITE_BATCH]
                store.write_queries(fingerprint, batch, encoder.encode(batch))
                bar.update(len(batch))
        summary.encoded = len(todo)
    return summary


def _register_once(
    store: FeatureStore, fingerprint: str, kind: str, dim: int, config: dict[str, Any]
) -> None:
    """Register unless known: equal fingerprints mean equal numbers, whatever paths the configs name."""
    try:
        store.extractor_info(fingerprint)
    except MissingFeatureError:
        store.register_extractor(fingerprint, kind=kind, dim=dim, config=config)


@dataclass
class _End:
    error: BaseException | None = None


def _prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Produce `items` in a background thread, at most `depth` ahead; errors re-raise in the consumer."""
    slots: queue.Queue[T | _End] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: T | _End) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                slots.put(item, timeout=0.1)
                return

    def produce() -> None:
        try:
            for item in items:
                put(item)
                if stop.is_set():
                    return
            put(_End())
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(_End(err))

    worker = threading.Thread(target=produce, name="decode-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        worker.join()
