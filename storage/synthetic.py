"""Seeded feature-level PRVR benchmark: untrimmed "videos" and captions as matrices, no decoding.

Tests and benchmarks of the model and the trainer need data that is fast to make, exactly reproducible and
provably learnable. A video is a sequence of contiguous event segments; each event is a concept prototype
plus an event-specific offset (so a caption can single out its video) plus per-row noise. A caption is a
noisy token sequence derived from ONE event through a fixed random projection from visual to query space,
mixed with shared "function word" tokens. Every video also spends part of its rows on distractor events
drawn from a small pool shared by all videos and never captioned, so a whole-video average is dominated by
common content and only the matching segment tells videos apart: partial relevance matters, as in PRVR.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.annotations import AnnotationSet, QueryRecord
from storage.demo_corpus import SplitFractions, assign_splits, check_min_max

if TYPE_CHECKING:
    from storage.feature_store import FeatureStore

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
N_FILLER_WORDS = 8


class SyntheticConfig(BaseModel):
    """Sizes and difficulty. Defaults: a few hundred small videos that a CPU trains on in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_videos: int = Field(200, ge=3)
    queries_per_video: int = Field(2, ge=1, description="captions per video, at most one per event")
    visual_dim: int = Field(64, ge=2)
    query_dim: int = Field(48, ge=2)
    min_events: int = Field(2, ge=1, description="captionable events per video")
    max_events: int = Field(5, ge=1)
    min_rows: int = Field(24, ge=2, description="feature rows per video")
    max_rows: int = Field(96, ge=2)
    n_concepts: int = Field(64, ge=2)
    n_distractors: int = Field(4, ge=0, description="size of the distractor pool shared by all videos")
    distractor_share: float = Field(0.5, ge=0.0, le=0.9, description="fraction of each video's rows")
    instance_noise: float = Field(0.5, ge=0.0, description="norm of an event's offset from its prototype")
    row_noise: float = Field(0.6, ge=0.0, description="norm of each row's noise")
    token_noise: float = Field(0.8, ge=0.0, description="norm of each caption token's noise")
    filler_fraction: float = Field(0.3, ge=0.0, lt=1.0, description="share of tokens that carry no concept")
    min_tokens: int = Field(6, ge=1)
    max_tokens: int = Field(20, ge=1)
    row_seconds: float = Field(1.0, gt=0.0, description="time span of one feature row")
    split_fractions: SplitFractions = (0.7, 0.15, 0.15)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_ranges(self) -> SyntheticConfig:
        pairs = (("min_events", "max_events"), ("min_rows", "max_rows"), ("min_tokens", "max_tokens"))
        check_min_max(self, *pairs)
        if self.n_concepts < self.max_events:
            raise ValueError(f"n_concepts ({self.n_concepts}) < max_events ({self.max_events})")
        if self.event_rows(self.min_rows) < self.max_events:
            raise ValueError(
                f"min_rows ({self.min_rows}) leaves fewer than max_events ({self.max_events}) rows for events"
                f" after distractor_share ({self.distractor_share})"
            )
        return self

    @property
    def has_distractors(self) -> bool:
        return self.n_distractors > 0 and self.distractor_share > 0

    def event_rows(self, n_rows: int) -> int:
        """Rows of an n_rows video left to captionable events."""
        return n_rows - round(self.distractor_share * n_rows) if self.has_distractors else n_rows


@dataclass(frozen=True)
class SyntheticEvent:
    """Rows [first_row, first_row + n_rows) show `concept` (a distractor-pool index if distractor)."""

    concept: int
    first_row: int
    n_rows: int
    distractor: bool


@dataclass(frozen=True)
class SyntheticVideo:
    video_id: str
    split: str
    features: np.ndarray  # (T, visual_dim) float32
    times: np.ndarray  # (T, 2) float64 seconds
    events: tuple[SyntheticEvent, ...]


@dataclass(frozen=True)
class SyntheticPRVR:
    """The benchmark plus the hidden generative truth (prototypes, projection) that oracles and tests use."""

    config: SyntheticConfig
    videos: tuple[SyntheticVideo, ...]
    queries: tuple[QueryRecord, ...]
    query_tokens: tuple[np.ndarray, ...]  # (N_j, query_dim) float32
    query_concepts: np.ndarray  # (Q,) concept of each query's event
    query_video: np.ndarray  # (Q,) index into `videos`
    prototypes: np.ndarray  # (n_concepts, visual_dim)
    distractor_prototypes: np.ndarray  # (n_distractors, visual_dim)
    projection: np.ndarray  # (visual_dim, query_dim): visual concept space -> query space

    def video_indices(self, split: str) -> list[int]:
        return [i for i, v in enumerate(self.videos) if v.split == split]

    def query_indices(self, split: str) -> list[int]:
        return [j for j, q in enumerate(self.queries) if q.split == split]

    def annotation_set(self, split: str | None = None) -> AnnotationSet:
        """The captions as our annotation records, as `read_annotations` would return them."""
        queries = [q for q in self.queries if split is None or q.split == split]
        return AnnotationSet(queries=queries, skipped=[], format="synthetic")


def make_synthetic_benchmark(cfg: SyntheticConfig) -> SyntheticPRVR:
    """Draw the benchmark; video i depends only on (seed, i), so a larger n_videos extends a smaller one."""
    rng = np.random.default_rng([cfg.seed, 0])
    prototypes = _unit_rows(rng.standard_normal((cfg.n_concepts, cfg.visual_dim)))
    distractors = _unit_rows(rng.standard_normal((cfg.n_distractors, cfg.visual_dim)))
    projection = rng.standard_normal((cfg.visual_dim, cfg.query_dim)) / np.sqrt(cfg.visual_dim)
    fillers = _unit_rows(rng.standard_normal((N_FILLER_WORDS, cfg.query_dim)))
    splits = assign_splits(cfg.n_videos, cfg.split_fractions, cfg.seed)
    videos, queries, tokens, concepts, owners = [], [], [], [], []
    for i in range(cfg.n_videos):
        video_rng = np.random.default_rng([cfg.seed, 1, i])
        video_id = f"synth{i:05d}"
        events = _plan_events(video_rng, cfg)
        latents = [_event_latent(video_rng, e, prototypes, distractors, cfg) for e in events]
        rows = [
            lat + _noise(video_rng, (e.n_rows, cfg.visual_dim), cfg.row_noise)
            for e, lat in zip(events, latents, strict=True)
        ]
        features = np.concatenate(rows).astype(np.float32)
        edges = np.arange(len(features) + 1) * cfg.row_seconds
        times = np.stack([edges[:-1], edges[1:]], axis=1)
        videos.append(SyntheticVideo(video_id, splits[i], features, times, tuple(events)))
        captionable = [k for k, e in enumerate(events) if not e.distractor]
        n_captions = min(cfg.queries_per_video, len(captionable))
        for k, event_index in enumerate(
            sorted(video_rng.choice(captionable, size=n_captions, replace=False))
        ):
            event = events[event_index]
            tokens.append(_caption_tokens(video_rng, latents[event_index] @ projection, fillers, cfg))
            text = (
                f"synthetic query {len(queries)} (concept {event.concept})"  # unique: the store keys by text
            )
            start, end = event.first_row * cfg.row_seconds, (event.first_row + event.n_rows) * cfg.row_seconds
            queries.append(QueryRecord(f"{video_id}#enc#{k}", video_id, text, start, end, splits[i]))
            concepts.append(event.concept)
            owners.append(i)
    logger.debug("synthetic benchmark: %d videos, %d queries", len(videos), len(queries))
    return SyntheticPRVR(
        config=cfg,
        videos=tuple(videos),
        queries=tuple(queries),
        query_tokens=tuple(tokens),
        query_concepts=np.asarray(concepts, dtype=np.int64),
        query_video=np.asarray(owners, dtype=np.int64),
        prototypes=prototypes,
        distractor_prototypes=distractors,
        projection=projection,
    )


def synthetic_fingerprints(cfg: SyntheticConfig) -> tuple[str, str]:
    """(visual, text) extractor fingerprints: any change to the config or the generator gives new ones."""
    digest = hashlib.sha256(json.dumps(_provenance(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return f"synthetic-visual-{digest}", f"synthetic-text-{digest}"


def write_to_store(synth: SyntheticPRVR, store: FeatureStore) -> tuple[str, str]:
    """Write every video and query into `store` (skipping what it has); returns (visual, text) fingerprints.

    A video's key is the sha256 of its feature bytes, standing in for the file hash real videos are keyed by.
    New entries are packed afterwards, so training reads them the fast way, as it would real features.
    """
    cfg = synth.config
    visual_fp, text_fp = synthetic_fingerprints(cfg)
    store.register_extractor(visual_fp, kind="visual", dim=cfg.visual_dim, config=_provenance(cfg))
    store.register_extractor(text_fp, kind="text", dim=cfg.query_dim, config=_provenance(cfg))
    wrote_videos = False
    for video in synth.videos:
        sha256 = hashlib.sha256(video.features.tobytes()).hexdigest()
        if not store.has_video(sha256, visual_fp):
            store.write_video(sha256, visual_fp, video.features, video.times, video_id=video.video_id)
            wrote_videos = True
    texts = [q.text for q in synth.queries]
    missing = [j for j, have in enumerate(store.has_queries(text_fp, texts)) if not have]
    if missing:
        store.write_queries(text_fp, [texts[j] for j in missing], [synth.query_tokens[j] for j in missing])
    for fingerprint, wrote in ((visual_fp, wrote_videos), (text_fp, bool(missing))):
        if wrote:
            store.pack(fingerprint)
    logger.info("synthetic benchmark in %s: %s, %s", store.url, visual_fp, text_fp)
    return visual_fp, text_fp


def _provenance(cfg: SyntheticConfig) -> dict[str, object]:
    return {"generator": "mamfusion.synthetic", "version": GENERATOR_VERSION, **cfg.model_dump(mode="json")}


def _plan_events(rng: np.random.Generator, cfg: SyntheticConfig) -> list[SyntheticEvent]:
    """Random segment lengths and order; captionable concepts are distinct within a video."""
    n_rows = int(rng.integers(cfg.min_rows, cfg.max_rows + 1))
    n_events = int(rng.integers(cfg.min_events, cfg.max_events + 1))
    segments = [(int(c), False) for c in rng.choice(cfg.n_concepts, size=n_events, replace=False)]
    event_rows = cfg.event_rows(n_rows)
    lengths = _partition(rng, event_rows, n_events)
    if cfg.has_distractors:
        n_segments = int(rng.integers(1, 3))
        segments += [(int(c), True) for c in rng.choice(cfg.n_distractors, size=n_segments)]
        lengths += _partition(rng, n_rows - event_rows, n_segments)
    order = rng.permutation(len(segments))
    events, row = [], 0
    for k in order:
        if lengths[k] == 0:
            continue
        concept, distractor = segments[k]
        events.append(SyntheticEvent(concept, row, lengths[k], distractor))
        row += lengths[k]
    return events


def _partition(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """`parts` positive lengths summing to `total` (zeros only when total < parts)."""
    if total < parts:
        return [1] * total + [0] * (parts - total)
    return [1 + int(n) for n in rng.multinomial(total - parts, np.full(parts, 1.0 / parts))]


def _event_latent(
    rng: np.random.Generator,
    event: SyntheticEvent,
    prototypes: np.ndarray,
    distractors: np.ndarray,
    cfg: SyntheticConfig,
) -> np.ndarray:
    """Captionable events get their own offset; distractors are identical in every video (their point)."""
    if event.distractor:
        return distractors[event.concept]
    return prototypes[event.concept] + _noise(rng, (cfg.visual_dim,), cfg.instance_noise)


def _caption_tokens(
    rng: np.random.Generator, meaning: np.ndarray, fillers: np.ndarray, cfg: SyntheticConfig
) -> np.ndarray:
    n_tokens = int(rng.integers(cfg.min_tokens, cfg.max_tokens + 1))
    is_filler = rng.random(n_tokens) < cfg.filler_fraction
    is_filler[rng.integers(n_tokens)] = False  # every caption says something about its event
    base = np.where(is_filler[:, None], fillers[rng.integers(len(fillers), size=n_tokens)], meaning)
    return (base + _noise(rng, (n_tokens, cfg.query_dim), cfg.token_noise)).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    """Gaussian noise whose rows have expected norm about `norm`."""
    return rng.standard_normal(shape) * (norm / np.sqrt(shape[-1]))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
