"""Build the search index of a published model, and answer text queries against it.

`build_index` encodes each gallery video once (MODEL_SPEC §11: video vectors do not depend on the query)
into the Zarr index of `storage.index`, and on later runs encodes only videos it has not seen. `Searcher`
loads the model, its text backbone and the index once, then scores query batches block by block over the
index (`tasks.scan`: score = clip_scale_w * max-clip cosine + frame_scale_w * video cosine, as
`MamFusion.score`) with a running top-k, so memory stays bounded whatever the gallery size; an index larger
than `max_memory_bytes` is streamed from its store instead of loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import Tensor

from models.mamfusion import MamFusion
from models.preprocess import clip_spans, collate_queries, collate_videos
from models.text_backbones import TextEncoder
from storage.catalog import Catalog
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore
from storage.index import DEFAULT_CHUNK_ROWS, Dtype, IndexNotFoundError, VideoIndex
from storage.registry import ModelDir, Skipped, resolve_model_dir
from tasks.data import DataError
from tasks.moments import SpanRule, localize
from tasks.profiles import text_encoder_from_info
from tasks.scan import Kernel, TopK, pick_kernel, scan_topk, score_matmul

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # a guard, not a model limit: tokens past max_desc_l are dropped as in training
# In RAM a block is a scan thread's unit of work: at most 4096 videos (100 MB at 33 x 384 fp16), where its
# top-k merge is noise, and at least 32 blocks per index, so the threads finish together (BENCHMARKS.md)
MEMORY_BLOCK_VIDEOS, MEMORY_BLOCKS = 4096, 32


class ApproximateSearchError(MamFusionError, ValueError):
    """The approximate first stage cannot be built for this index (bad factory string, too few videos)."""


class QueryError(MamFusionError, ValueError):
    """A query the searcher refuses (empty or too long); the message says which and why."""


@dataclass(frozen=True)
class Hit:
    """One ranked video and the moment that matched the query.

    `start`-`end` is the span the rule grew from the clip-score `profile` (one cosine per clip, whose
    time spans are `clip_spans`); `clip_start`-`clip_end` is the single best clip, kept as the baseline.
    """

    rank: int
    video_id: str
    path: str
    score: float
    start: float
    end: float
    clip_start: float
    clip_end: float
    profile: tuple[float, ...]
    clip_spans: tuple[tuple[float, float], ...]


def default_index_url(model: ModelDir) -> str:
    """Where `mamfusion index` writes and `mamfusion search` looks when no URL is given."""
    return str(model.index_dir)


# ---------------------------------------------------------------------------------------------- scanning
class IndexScanner:
    """One index ready to scan: vectors in RAM if they fit in `max_memory_bytes`, else streamed from Zarr.

    `kernel` picks the scoring loop (`tasks.scan`): "auto" takes the fused kernel for fp16 indexes and falls
    back to "matmul" (with a warning) where it cannot be built.
    """

    def __init__(
        self, index: VideoIndex, *, max_memory_bytes: int | None = None, kernel: Kernel = "auto"
    ) -> None:
        self.index = index
        self.kernel = pick_kernel(kernel, index.dtype)
        rows = index.rows()
        self.video_ids = rows.video_ids
        self.paths = rows.paths
        self.alive = torch.from_numpy(rows.alive)
        self.spans = index.read_spans()
        budget = psutil.virtual_memory().available // 2 if max_memory_bytes is None else max_memory_bytes
        self.vectors = torch.from_numpy(index.load_vectors()) if index.nbytes <= budget else None
        if self.vectors is None:
            log.info(
                "index %s (%.1f GB) exceeds the memory budget; streaming it per search",
                index.url,
                index.nbytes / 1e9,
            )

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """The whole index as `(first_row, rows)` blocks: MEMORY_BLOCKS or more in RAM, one per store chunk
        when streamed."""
        if self.vectors is not None:
            step = max(1, min(MEMORY_BLOCK_VIDEOS, -(-len(self.vectors) // MEMORY_BLOCKS)))
            for start in range(0, len(self.vectors), step):
                yield start, self.vectors[start : start + step]
            return
        for start, block in self.index.iter_vectors():
            # the chunk is a view of the store's read-only bytes; the scan never writes to it
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                yield start, torch.from_numpy(block)

    def topk(self, queries: Tensor, top_k: int, weights: tuple[float, float]) -> TopK:
        return scan_topk(queries, self.blocks(), self.alive, top_k, weights, self.kernel)

    def gather(self, rows: np.ndarray) -> Tensor:
        """(len(rows), n_clips + 1, d) vectors of ascending rows, from RAM or the store."""
        if self.vectors is not None:
            return self.vectors[torch.from_numpy(rows)]
        return torch.from_numpy(self.index.read_rows(rows))

    def hits(self, top: TopK, queries: Tensor, rule: SpanRule = SpanRule()) -> list[list[Hit]]:  # noqa: B008
        """Scan rows -> ids, paths, score profiles and moments; -inf entries (fewer candidates than k) drop.

        The profile is recomputed from the hit rows' clip vectors (k rows per query: cheap next to the scan).
        """
        found = top.scores != float("-inf")
        rows = np.unique(top.rows[found].numpy())
        profiles = torch.zeros(*top.rows.shape, self.index.n_clips)
        if len(rows):
            clips = self.gather(rows)[:, : self.index.n_clips].float()  # (R, n_clips, d), unit vectors
            where = torch.from_numpy(
                np.searchsorted(rows, top.rows.clamp(min=0).numpy()).clip(0, len(rows) - 1)
            )
            profiles = torch.einsum("qd,qknd->qkn", queries.float(), clips[where])
        # numpy views and whole-array rounding: per-element tensor indexing cost ~0.3 ms a hit under load
        scores, hit_rows, hit_clips = top.scores.numpy(), top.rows.numpy(), top.clips.numpy()
        profiles_np = profiles.numpy()
        rounded = np.round(profiles_np.astype(np.float64), 5)
        out = []
        for q in range(scores.shape[0]):
            ranked = []
            for r in np.flatnonzero(found[q].numpy()):
                row, clip = int(hit_rows[q, r]), int(hit_clips[q, r])
                spans = self.spans[row]
                start, end = localize(profiles_np[q, r], spans, rule)
                ranked.append(
                    Hit(
                        len(ranked) + 1,
                        str(self.video_ids[row]),
                        str(self.paths[row]),
                        float(scores[q, r]),
                        start,
                        end,
                        float(spans[clip, 0]),
                        float(spans[clip, 1]),
                        tuple(rounded[q, r].tolist()),
                        tuple(map(tuple, spans.tolist())),
                    )
                )
            out.append(ranked)
        return out


@dataclass(frozen=True)
class ApproxConfig:
    """Settings of the optional approximate first stage (a faiss IVF index, inner product)."""

    # faiss index_factory string; None: 256 coarse cells and 4-bit PQ codes, one sub-quantizer per 8 dims
    # (d=384: "IVF256,PQ48x4fs", 24 bytes per vector), in faiss's SIMD "fast scan" layout, which scans codes
    # ~5x faster than plain IVF-PQ at 1M videos. 8-bit PQ codes train ~15x slower.
    factory: str | None = None
    nprobe: int = 16  # cells visited per query
    # nearest stored vectors per query (their videos are re-scored exactly); None: grows with the gallery, as
    # near neighbours do - 256 gave recall@10 0.96 at 100k videos but 0.67 at 1M, where 2048 gives 0.975
    candidates: int | None = None
    train_vectors: int = 65536

    def candidates_for(self, n_videos: int) -> int:
        """Candidates for a gallery of `n_videos`: the set value, or 1 per 500 videos within 256..4096."""
        return self.candidates or min(4096, max(256, n_videos // 500))

    def factory_for(self, dim: int) -> str:
        """The factory string; PQ needs sub-quantizers that divide `dim`, so the default picks the most that
        keep at least 8 dims each."""
        if self.factory:
            return self.factory
        sub = max(m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= min(8, dim))
        return f"IVF256,PQ{sub}x4fs"


def _faiss_reason(error: RuntimeError) -> str:
    """faiss errors read "Error in <C++ signature> at <file>:<line>: Error: '<check>' failed: <reason>"."""
    first = str(error).strip().splitlines()[0]
    return first.rsplit("failed: ", 1)[-1]


class ApproximateSearch:
    """First stage for very large galleries: a faiss IVF index over every clip and pooled vector.

    A query's nearest stored vectors name candidate videos and only those are scored exactly (same score and
    moment as the full scan), so a query touches `nprobe / nlist` of compact codes plus a few hundred
    rows instead of the whole index. It can miss videos the exact scan finds: the benchmark reports recall@10.
    """

    def __init__(self, scanner: IndexScanner, config: ApproxConfig | None = None) -> None:
        try:
            import faiss  # optional extra `mamfusion[search]`
        except ImportError as e:
            raise ImportError("the approximate stage needs faiss-cpu: pip install 'mamfusion[search]'") from e
        self.scanner = scanner
        self.config = config or ApproxConfig()
        cfg, index = self.config, scanner.index
        self.factory = cfg.factory_for(index.dim)
        try:
            self.ann = faiss.index_factory(index.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ApproximateSearchError(
                f"faiss index {self.factory!r} for {index.dim}-d vectors: {_faiss_reason(e)}"
            ) from e
        per_video = index.n_clips + 1
        n_train = -(-cfg.train_vectors // per_video)
        picks = np.unique(np.linspace(0, index.count - 1, n_train).astype(np.int64))
        try:
            self.ann.train(scanner.gather(picks).reshape(-1, index.dim).float().numpy())
        except RuntimeError as e:  # e.g. fewer vectors than IVF cells: a small index needs no first stage
            raise ApproximateSearchError(
                f"the approximate stage {self.factory!r} cannot be trained on {index.count} videos "
                f"({_faiss_reason(e)}); search exactly instead"
            ) from e
        for start, block in scanner.blocks():
            flat = block.reshape(-1, index.dim).float().numpy()
            self.ann.add_with_ids(flat, np.repeat(np.arange(start, start + len(block)), per_video))
        faiss.ParameterSpace().set_index_parameter(self.ann, "nprobe", cfg.nprobe)

    def topk(self, queries: Tensor, top_k: int, weights: tuple[float, float]) -> TopK:
        """Candidates from the ANN index, then the exact score of each; short lists are padded with -inf."""
        _, ids = self.ann.search(queries.numpy(), self.config.candidates_for(self.scanner.index.count))
        alive = self.scanner.alive.numpy()
        shape = (len(queries), top_k)
        out = TopK(
            torch.full(shape, float("-inf")),
            torch.zeros(shape, dtype=torch.long),
            torch.zeros(shape, dtype=torch.long),
        )
        for i, cand in enumerate(ids):
            rows = np.unique(cand[cand >= 0])
            rows = rows[alive[rows]]
            if not len(rows):
                continue
            scores, clips = score_matmul(queries[i : i + 1], self.scanner.gather(rows), weights)
            top, pos = scores[0].topk(min(top_k, len(rows)))
            out.scores[i, : len(top)] = top
            out.rows[i, : len(top)] = torch.from_numpy(rows)[pos]
            out.clips[i, : len(top)] = clips[0, pos]
        return out


# ---------------------------------------------------------------------------------------------- searching
class Searcher:
    """Model + text backbone + index, loaded once; `search` answers batches of queries together."""

    def __init__(
        self,
        model: MamFusion,
        text_encoder: TextEncoder,
        scanner: IndexScanner,
        *,
        approximate: ApproximateSearch | None = None,
        max_query_chars: int = MAX_QUERY_CHARS,
        query_batch: int = 256,
        span_rule: SpanRule = SpanRule(),  # noqa: B008 (frozen)
    ) -> None:
        self.span_rule = span_rule
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.scanner = scanner
        self.ranker: IndexScanner | ApproximateSearch = approximate or scanner
        self.max_query_chars = max_query_chars
        self.query_batch = query_batch

    @classmethod
    def from_model_dir(
        cls,
        model_dir: ModelDir | str | os.PathLike[str],
        index_url: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        max_memory_bytes: int | None = None,
        kernel: Kernel = "auto",
        approximate: ApproxConfig | None = None,
    ) -> Searcher:
        """Check the index belongs to this model (by fingerprint of its files), then load everything.

        `model_dir` may be a version folder, a models folder or a pipeline output folder (its `current`).
        Nothing is opened for writing, and the feature store is not needed: the model directory carries the
        text extractor's config.
        """
        model_dir = model_dir if isinstance(model_dir, ModelDir) else resolve_model_dir(model_dir)
        fingerprint = model_dir.fingerprint()
        index = VideoIndex.open(index_url or default_index_url(model_dir), storage_options=storage_options)
        index.check_model(fingerprint)
        if not index.complete:
            log.warning(
                "index %s is incomplete (a build is running or was interrupted); results may miss videos",
                index.url,
            )
        text = model_dir.read_features().text
        encoder = text_encoder_from_info(text.model_dump(), text.fingerprint)
        model = MamFusion.from_pretrained(model_dir.path)
        scanner = IndexScanner(index, max_memory_bytes=max_memory_bytes, kernel=kernel)
        ann = ApproximateSearch(scanner, approximate) if approximate else None
        return cls(model, encoder, scanner, approximate=ann)

    def check_queries(self, texts: Sequence[str]) -> None:
        """Reject empty and over-long queries before any work, naming the query."""
        if not texts:
            raise QueryError("no query given")
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # argv bytes that were not UTF-8 arrive as lone surrogates
                raise QueryError(f"query {i} is not valid UTF-8 text") from None
            if not text.strip():
                raise QueryError(f"query {i} is empty; type what should happen in the video")
            if len(text) > self.max_query_chars:
                raise QueryError(
                    f"query {i} has {len(text)} characters; the limit is {self.max_query_chars} "
                    f"(and the model reads only its first {self.model.config.max_desc_l} tokens)"
                )

    @torch.inference_mode()
    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        """(B, d) L2-normalised query vectors through the text backbone the model was trained with."""
        self.check_queries(texts)
        tokens = self.text_encoder.encode(list(texts))
        batch = collate_queries(tokens, self.model.config.max_desc_l)
        return F.normalize(self.model.encode_queries(batch).float(), dim=-1)

    def search(self, texts: Sequence[str], top_k: int = 10) -> list[list[Hit]]:
        """Per query, the `top_k` best videos with score and matching moment."""
        if top_k < 1:
            raise QueryError(f"top_k must be at least 1, got {top_k}")
        self.check_queries(texts)
        cfg = self.model.config
        out: list[list[Hit]] = []
        for start in range(0, len(texts), self.query_batch):
            queries = self.encode_queries(texts[start : start + self.query_batch])
            top = self.ranker.topk(queries, top_k, (cfg.clip_scale_w, cfg.frame_scale_w))
            out.extend(self.scanner.hits(top, queries, self.span_rule))
        return out


# ---------------------------------------------------------------------------------------------- building
@dataclass
class IndexSummary:
    """What a build did; JSON-ready via `dataclasses.asdict`."""

    index_url: str
    model_fingerprint: str
    dtype: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    rebuilt: str | None = None  # why an existing index was replaced, if it was

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "skipped": [s.model_dump() for s in self.skipped]}


def _skip(video_id: str, reason: str) -> Skipped:
    return Skipped(kind="video", id=video_id, reason=reason)


@dataclass(frozen=True)
class _Wanted:
    sha256: str
    path: str


def _gallery_from_catalog(
    catalog: Catalog, store: FeatureStore, visual_fp: str, skipped: list[Skipped]
) -> dict[str, _Wanted]:
    wanted = {}
    for rec in catalog.videos:
        if not rec.readable:
            skipped.append(_skip(rec.video_id, f"unreadable: {rec.error}"))
        elif rec.sha256 is None:
            skipped.append(_skip(rec.video_id, "catalog has no sha256 for it; rescan the folder"))
        elif not store.has_video(rec.sha256, visual_fp):
            skipped.append(_skip(rec.video_id, f"no features for visual extractor {visual_fp}"))
        else:
            wanted[rec.video_id] = _Wanted(rec.sha256, rec.path)
    return wanted


def _gallery_from_ids(
    video_ids: Sequence[str], store: FeatureStore, visual_fp: str, skipped: list[Skipped]
) -> dict[str, _Wanted]:
    found = store.resolve_video_ids(visual_fp, video_ids)
    for vid in video_ids:
        if vid not in found:
            skipped.append(_skip(vid, f"no features for visual extractor {visual_fp}"))
    return {vid: _Wanted(found[vid], "") for vid in video_ids if vid in found}


@torch.inference_mode()
def encode_for_index(
    model: MamFusion, feats: Sequence[np.ndarray], times: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Videos -> (B, n_clips + 1, d) L2-normalised vectors (clips, then pooled) and (B, n_clips, 2) spans.

    The frame branch's Gaussian widths follow the padded batch length, so a padded batch would make a video's
    vectors depend on its batch-mates. Only videos of equal frame-view length share a forward pass here: each
    video gets the vectors it gets alone, whatever else is indexed with it, now or in a later update.
    """
    cfg = model.config
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(feats):
        groups.setdefault(min(len(f), cfg.max_ctx_l), []).append(i)
    vectors = np.empty((len(feats), cfg.map_size + 1, cfg.hidden_size), dtype=np.float32)
    for members in groups.values():
        emb = model.encode_videos(collate_videos([feats[i] for i in members], cfg.map_size, cfg.max_ctx_l))
        both = torch.cat([F.normalize(emb.clips, dim=-1), F.normalize(emb.video, dim=-1)[:, None]], dim=1)
        vectors[members] = both.float().numpy()
    spans = np.stack([clip_spans(t, cfg.map_size).numpy() for t in times])
    return vectors, spans


def _open_for_update(
    url: str, fingerprint: str, dtype: Dtype, storage_options: dict[str, Any] | None, **layout: int
) -> tuple[VideoIndex, str | None]:
    """The existing index if it fits this model and dtype, else a fresh one and the reason for replacing."""
    try:
        index = VideoIndex.open(url, mode="r+", storage_options=storage_options)
    except IndexNotFoundError:
        index, reason = None, None
    else:
        if index.model_fingerprint != fingerprint:
            reason = f"built by model {index.model_fingerprint[:12]}, this model is {fingerprint[:12]}"
        elif index.dtype != dtype:
            reason = f"stored as {index.dtype}, {dtype} requested"
        else:
            return index, None
        log.warning("rebuilding index %s: %s", url, reason)
    index = VideoIndex.create(
        url, model_fingerprint=fingerprint, dtype=dtype, storage_options=storage_options, **layout
    )
    return index, reason


def build_index(
    model_dir: ModelDir | str | os.PathLike[str],
    store: FeatureStore | str | None = None,
    index_url: str | None = None,
    *,
    catalog: Catalog | None = None,
    video_ids: Sequence[str] | None = None,
    dtype: Dtype = "float16",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    batch_size: int = 32,
    storage_options: dict[str, Any] | None = None,
) -> IndexSummary:
    """Bring the index of `model_dir` in line with a gallery (a catalog's videos, or `video_ids`).

    Encodes only videos not yet indexed, tombstones videos gone from the gallery (or whose content changed,
    which are then re-added), and rebuilds from scratch when the model's files (fingerprint) or dtype changed.
    """
    if (catalog is None) == (video_ids is None):
        raise TypeError("give exactly one gallery: a catalog or a list of video ids")
    model_dir = model_dir if isinstance(model_dir, ModelDir) else resolve_model_dir(model_dir)
    fingerprint = model_dir.fingerprint()
    features = model_dir.read_features()
    visual_fp = features.visual.fingerprint
    if not isinstance(store, FeatureStore):
        store = FeatureStore(store or features.store, storage_options, read_only=True)
    cfg = MamFusion.read_config(model_dir.path)  # the weights load only if a video needs encoding
    url = index_url or default_index_url(model_dir)
    layout = {"dim": cfg.hidden_size, "n_clips": cfg.map_size, "chunk_rows": chunk_rows}
    index, rebuilt = _open_for_update(url, fingerprint, dtype, storage_options, **layout)
    summary = IndexSummary(url, fingerprint, dtype, rebuilt=rebuilt)
    if catalog is not None:
        wanted = _gallery_from_catalog(catalog, store, visual_fp, summary.skipped)
    else:
        wanted = _gallery_from_ids(video_ids or [], store, visual_fp, summary.skipped)

    rows = index.rows()
    stale, present = [], set()
    for row, (vid, path, sha, alive) in enumerate(
        zip(rows.video_ids, rows.paths, rows.sha256, rows.alive, strict=True)
    ):
        if not alive:
            continue
        if wanted.get(str(vid)) == _Wanted(str(sha), str(path)):
            present.add(str(vid))
        else:
            stale.append(row)
            summary.removed.append(str(vid))
    todo = [vid for vid in wanted if vid not in present]
    summary.kept = len(present)
    index.set_complete(False)
    index.remove(stale)
    model = functools.cache(lambda: MamFusion.from_pretrained(model_dir.path).eval())  # first use only
    for start in range(0, len(todo), batch_size):
        ids = todo[start : start + batch_size]
        shas = [wanted[v].sha256 for v in ids]
        videos = store.read_videos(visual_fp, shas)
        finite = [bool(np.isfinite(v.features).all()) for v in videos]
        for vid, ok in zip(ids, finite, strict=True):
            if not ok:
                summary.skipped.append(_skip(vid, "non-finite features; re-extract it"))
        ids = [v for v, ok in zip(ids, finite, strict=True) if ok]
        shas = [s for s, ok in zip(shas, finite, strict=True) if ok]
        videos = [v for v, ok in zip(videos, finite, strict=True) if ok]
        if not videos:
            continue
        dims = {v.features.shape[1] for v in videos}
        if dims != {cfg.visual_dim}:
            raise DataError(
                f"store {store.url}: visual features {visual_fp} are {sorted(dims)}-d, "
                f"the model expects {cfg.visual_dim}"
            )
        vectors, spans = encode_for_index(model(), [v.features for v in videos], [v.times for v in videos])
        index.append(vectors, spans, ids, [wanted[v].path for v in ids], shas)
        summary.added.extend(ids)
        log.info("indexed %d/%d new videos", len(summary.added), len(todo))
    index.set_complete(True)
    return summary
