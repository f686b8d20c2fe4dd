"""Training/evaluation data from the feature store: one split, read in bulk once and kept in RAM.

A `SplitData` holds the split's videos (features + row time spans) and its queries (token features), already
matched to each other. Nothing here touches the store after `load_split`, so data-loader workers never make
per-item store round-trips. A training item is one video with all its captions (MODEL_SPEC §6); collation is
`models.preprocess` (clip averaging, frame downsampling, L2, token truncation, padding and masks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from models.config import ExperimentConfig, MamFusionConfig
from models.preprocess import QueryBatch, VideoBatch, collate_queries, collate_videos
from storage.annotations import AnnotationSet, QueryRecord
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore
from storage.registry import Skipped

log = logging.getLogger(__name__)


class DataError(MamFusionError, ValueError):
    """The data cannot be used as asked (no split, ambiguous fingerprints, wrong feature size)."""


@dataclass
class SplitData:
    """One split in memory: videos with features, their queries, and everything skipped (with reasons)."""

    name: str
    video_ids: list[str]
    video_sha256: list[str]
    video_feats: list[np.ndarray]  # (T, Dv) float32 each
    video_times: list[np.ndarray]  # (T, 2) seconds each
    queries: list[QueryRecord]
    query_feats: list[np.ndarray]  # (N, Dq) float32 each
    query_video: list[int]  # index into video_ids of each query's own video
    visual_fingerprint: str
    text_fingerprint: str
    visual_dim: int
    query_dim: int
    skipped: list[Skipped] = field(default_factory=list)
    n_distractors: int = 0  # trailing gallery videos from outside the split (no queries of their own)

    def check_dims(self, model: MamFusionConfig) -> None:
        check_feature_dims(
            model, (self.visual_fingerprint, self.visual_dim), (self.text_fingerprint, self.query_dim)
        )

    def positives(self) -> list[list[int]]:
        """Per query, every gallery video with the same content (sha256) as its own video (usually one)."""
        by_sha: dict[str, list[int]] = {}
        for i, sha in enumerate(self.video_sha256):
            by_sha.setdefault(sha, []).append(i)
        return [by_sha[self.video_sha256[v]] for v in self.query_video]

    def digest(self) -> str:
        """sha256 of exactly what was read: videos (id, content) and queries (id, text, video)."""
        payload = {
            "name": self.name,
            "videos": list(zip(self.video_ids, self.video_sha256, strict=True)),
            "queries": [(q.query_id, q.text, self.query_video[i]) for i, q in enumerate(self.queries)],
            "fingerprints": [self.visual_fingerprint, self.text_fingerprint],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def captions_by_video(self) -> list[list[int]]:
        """Per video, the indices of its queries in file order (empty for a gallery-only video)."""
        out: list[list[int]] = [[] for _ in self.video_ids]
        for q, v in enumerate(self.query_video):
            out[v].append(q)
        return out


def _only_extractor(store: FeatureStore, kind: str, given: str | None, covers: Callable[[str], bool]) -> str:
    found = (
        [given]
        if given
        else [fp for fp, i in sorted(store.extractors().items()) if i["kind"] == kind and covers(fp)]
    )
    if len(found) != 1:
        raise DataError(
            f"store {store.url}: need exactly one {kind} extractor with features for these annotations, "
            f"found {', '.join(found) or 'none'}; pass --{kind}-fingerprint"
        )
    return found[0]


def pick_fingerprints(
    store: FeatureStore,
    annotations: AnnotationSet,
    visual_fp: str | None = None,
    text_fp: str | None = None,
) -> tuple[str, str]:
    """Use the given fingerprints, or the only visual/text extractor in the store that has this data."""
    video_ids = annotations.video_ids()
    texts = list(dict.fromkeys(q.text for q in annotations.queries))
    return (
        _only_extractor(store, "visual", visual_fp, lambda fp: bool(store.resolve_video_ids(fp, video_ids))),
        _only_extractor(store, "text", text_fp, lambda fp: any(store.has_queries(fp, texts))),
    )


def check_feature_dims(model: MamFusionConfig, visual: tuple[str, int], text: tuple[str, int]) -> None:
    """Fail before training/evaluation when the features' sizes (fingerprint, dim) do not match the config."""
    for what, (fp, have), key in (("visual", visual, "visual_dim"), ("text", text, "query_dim")):
        want = getattr(model, key)
        if have != want:
            raise DataError(
                f"{what} features {fp} are {have}-d but the model config expects {key}={want}; "
                f"use a preset for these features or --set {key}={have}"
            )


def store_dims(store: FeatureStore, visual_fp: str, text_fp: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """(fingerprint, dim) of both extractors, as registered in the store."""
    visual, text = ((fp, int(store.extractor_info(fp)["dim"])) for fp in (visual_fp, text_fp))
    return visual, text


def _skip(skipped: list[Skipped], kind: str, item_id: str, reason: str) -> None:
    skipped.append(Skipped(kind=kind, id=item_id, reason=reason))


def _read_videos(
    store: FeatureStore, video_ids: list[str], fp: str, skipped: list[Skipped]
) -> tuple[list[str], list[str], list[np.ndarray], list[np.ndarray]]:
    """(ids, sha256s, features, times) of the videos that have usable features; identical content is read
    once. Non-finite rows are refused here, whatever wrote them: one NaN video would poison every score."""
    resolved = store.resolve_video_ids(fp, video_ids)
    for vid in video_ids:
        if vid not in resolved:
            _skip(skipped, "video", vid, f"no features under visual fingerprint {fp}")
    unique = list(dict.fromkeys(resolved[v] for v in video_ids if v in resolved))
    by_sha = dict(zip(unique, store.read_videos(fp, unique), strict=True))
    ids, shas, feats, times = [], [], [], []
    for vid in video_ids:
        if vid not in resolved:
            continue
        vf = by_sha[resolved[vid]]
        if vf.features.ndim != 2 or vf.features.shape[0] == 0:
            _skip(skipped, "video", vid, f"empty feature array {vf.features.shape}")
            continue
        bad = ~np.isfinite(vf.features).all(axis=1)
        if bad.any():
            _skip(skipped, "video", vid, f"{int(bad.sum())} feature rows are not finite (row {bad.argmax()})")
            continue
        ids.append(vid)
        shas.append(resolved[vid])
        feats.append(np.ascontiguousarray(vf.features, dtype=np.float32))
        times.append(np.asarray(vf.times, dtype=np.float64))
    return ids, shas, feats, times


def _read_queries(
    store: FeatureStore,
    queries: list[QueryRecord],
    index: dict[str, int],
    fp: str,
    skipped: list[Skipped],
) -> tuple[list[QueryRecord], list[np.ndarray], list[int]]:
    """Queries whose video was kept and whose text has token features, with those features and video index."""
    candidates = []
    for q in queries:
        if q.video_id in index:
            candidates.append(q)
        else:
            _skip(skipped, "query", q.query_id, f"its video {q.video_id} was skipped")
    texts = list(dict.fromkeys(q.text for q in candidates))
    readable = [t for t, have in zip(texts, store.has_queries(fp, texts), strict=True) if have]
    tokens = dict(zip(readable, store.read_queries(fp, readable), strict=True))
    kept, feats, owner = [], [], []
    for q in candidates:
        tok = tokens.get(q.text)
        if tok is None or tok.ndim != 2 or tok.shape[0] == 0 or not np.isfinite(tok).all():
            reason = (
                "no text features"
                if tok is None
                else f"empty token array {tok.shape}"
                if tok.ndim != 2 or tok.shape[0] == 0
                else "non-finite token features"
            )
            _skip(skipped, "query", q.query_id, f"{reason} under text fingerprint {fp}")
            continue
        kept.append(q)
        feats.append(np.ascontiguousarray(tok, dtype=np.float32))
        owner.append(index[q.video_id])
    return kept, feats, owner


def load_split(
    store: FeatureStore,
    annotations: AnnotationSet,
    split: str | None,
    visual_fp: str,
    text_fp: str,
    *,
    name: str | None = None,
    distractors: Sequence[str] = (),
) -> SplitData:
    """Bulk-read one split (`None` = all of `annotations`); items without features are skipped with a reason.

    `name` labels the result (default: the split, or "all"). `distractors` are further video ids appended to
    the gallery without queries (videos missing from the store are skipped), so the split's queries are
    ranked against a gallery large enough to mean something.
    """
    ann = annotations.split(split) if split else annotations
    name = name or split or "all"
    if not ann.queries:
        raise DataError(f"no queries in split {name!r}")
    skipped: list[Skipped] = []
    ids, shas, feats, times = _read_videos(store, ann.video_ids(), visual_fp, skipped)
    index = {v: i for i, v in enumerate(ids)}
    queries, query_feats, query_video = _read_queries(store, ann.queries, index, text_fp, skipped)
    own = set(ann.video_ids())
    extra = [v for v in dict.fromkeys(distractors) if v not in own]
    unused: list[Skipped] = []  # a distractor without features is simply not in the gallery
    more = _read_videos(store, extra, visual_fp, unused) if extra else ([], [], [], [])
    for lst, add in zip((ids, shas, feats, times), more, strict=True):
        lst.extend(add)
    if not queries:
        raise DataError(f"split {name!r}: no query has both video and text features ({len(skipped)} skipped)")
    if skipped:
        log.warning("split %s: skipped %d item(s), e.g. %s", name, len(skipped), skipped[0])
    (_, vdim), (_, qdim) = store_dims(store, visual_fp, text_fp)
    return SplitData(
        name,
        ids,
        shas,
        feats,
        times,
        queries,
        query_feats,
        query_video,
        visual_fp,
        text_fp,
        vdim,
        qdim,
        skipped,
        len(more[0]),
    )


@dataclass
class TrainBatch:
    """A training batch: videos, their captions (contiguous per video) and each caption's video index."""

    videos: VideoBatch
    queries: QueryBatch
    labels: torch.Tensor  # (B_q,) long

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(self.videos.to(device), self.queries.to(device), self.labels.to(device))

    def pin_memory(self) -> TrainBatch:
        """Called by DataLoader(pin_memory=True) so host->GPU copies can overlap compute."""
        return TrainBatch(_pinned(self.videos), _pinned(self.queries), self.labels.pin_memory())


def _pinned(batch):
    return dataclasses.replace(
        batch, **{f.name: getattr(batch, f.name).pin_memory() for f in dataclasses.fields(batch)}
    )


class VideoCaptionDataset(Dataset):
    """Item i = (video features, [token features of each of its captions]) for videos that have captions."""

    def __init__(self, data: SplitData) -> None:
        self.data = data
        self.items = [(v, qs) for v, qs in enumerate(data.captions_by_video()) if qs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, list[np.ndarray]]:
        v, qs = self.items[i]
        return self.data.video_feats[v], [self.data.query_feats[q] for q in qs]


@dataclass(frozen=True)
class TrainCollate:
    """Picklable collate function (workers may be spawned) built from the model config."""

    n_clips: int
    max_ctx_l: int
    max_desc_l: int

    def __call__(self, items: Sequence[tuple[np.ndarray, list[np.ndarray]]]) -> TrainBatch:
        videos = collate_videos([v for v, _ in items], self.n_clips, self.max_ctx_l)
        caps = [c for _, cs in items for c in cs]
        labels = torch.tensor([i for i, (_, cs) in enumerate(items) for _ in cs], dtype=torch.long)
        return TrainBatch(videos, collate_queries(caps, self.max_desc_l), labels)


def worker_count(requested: int) -> int:
    """Data-loader workers: presets ask for 28/48 (the authors' machine); never more than our CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, cpus)


def train_loader(
    data: SplitData, cfg: ExperimentConfig, generator: torch.Generator, device: torch.device
) -> DataLoader:
    """Shuffled loader over videos; the caller reseeds `generator` per epoch, so order ignores history.

    `generator` drives only the sampler: the loader's own worker-seed draw gets a separate generator, because
    it happens in a process's first epoch only (persistent workers) and would shift a resumed run's order.
    """
    workers = worker_count(cfg.train.num_workers)
    dataset = VideoCaptionDataset(data)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        generator=torch.Generator().manual_seed(cfg.train.seed),
        num_workers=workers,
        collate_fn=TrainCollate(cfg.model.map_size, cfg.model.max_ctx_l, cfg.model.max_desc_l),
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def video_batches(data: SplitData, model: MamFusionConfig, batch_size: int) -> Iterator[VideoBatch]:
    """The whole gallery in file order, `batch_size` videos at a time (official eval batches of 100)."""
    for start in range(0, len(data.video_feats), batch_size):
        yield collate_videos(data.video_feats[start : start + batch_size], model.map_size, model.max_ctx_l)


def query_batches(data: SplitData, model: MamFusionConfig, batch_size: int) -> Iterator[QueryBatch]:
    """All queries in order, `batch_size` at a time."""
    for start in range(0, len(data.query_feats), batch_size):
        yield collate_queries(data.query_feats[start : start + batch_size], model.max_desc_l)
