"""Text-to-video evaluation (MODEL_SPEC §10): encode the gallery once, then rank query chunks against it.

Scores are computed for `query_bsz` queries against `gallery_chunk` videos at a time, so the largest temporary
(queries x videos x clips) is bounded whatever the gallery size; only one (query chunk x gallery) block of
scalar scores is kept for ranking. Ranks use `tasks.metrics` (pessimistic ties, NaN never ranks well) and
every result states its gallery and chance level. Non-finite embeddings are refused, naming the videos or
queries.

Gallery policy: a split's own videos, or ("extended") those plus distractor videos from a pool the caller
names (validation: the training videos; test: every non-test video). "auto" extends galleries under
MIN_GALLERY videos, except on benchmark data (MS-SL bundles), which keeps the published protocol so numbers
stay comparable with the paper. Validation never sees test videos.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.mamfusion import MamFusion, VideoEmbedding
from models.preprocess import clip_spans
from storage.annotations import AnnotationSet, QueryRecord
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore
from storage.registry import ModelDir, MomentMetrics, RetrievalMetrics
from tasks.data import SplitData, load_split, query_batches, video_batches
from tasks.device import resolve_device
from tasks.metrics import positive_mask, rank_bounds, summarize
from tasks.moments import SpanRule, localize, moment_metrics, temporal_iou

log = logging.getLogger(__name__)

MIN_GALLERY = 100  # below this a split's own gallery is extended with distractors ("auto")
MIN_SELECTION_GALLERY = 20  # validation smaller than this cannot tell epochs apart: warn
BENCHMARK_FORMATS = frozenset({"mssl"})
GalleryPolicy = Literal["auto", "split", "extended"]


class NonFiniteScoreError(MamFusionError):
    """The model produced NaN/inf embeddings (diverged weights or damaged features); nothing is ranked."""


@dataclass
class RankOutput:
    """Per query: rank bounds of the best positive, top-k gallery indices/scores, best positive, its clip."""

    ranks: torch.Tensor  # (Q,) long, pessimistic
    optimistic: torch.Tensor  # (Q,) long
    top_index: torch.Tensor  # (Q, k) long
    top_score: torch.Tensor  # (Q, k)
    best_positive: torch.Tensor  # (Q,) long, gallery index
    best_clip: torch.Tensor  # (Q,) long, clip index inside best_positive
    best_profile: torch.Tensor  # (Q, n_clips) clip cosines of best_positive: where its moment is


@dataclass
class EvalResult:
    """Metrics plus the per-query detail written to eval/per_query.jsonl."""

    metrics: RetrievalMetrics
    ranks: np.ndarray
    per_query: list[dict]


def gallery_distractors(
    split: AnnotationSet,
    pool: AnnotationSet,
    policy: GalleryPolicy,
    annotation_format: str | None,
    extra_video_ids: list[str] | None = None,
) -> list[str]:
    """Video ids to add to a split's gallery under `policy` (see the module docstring)."""
    if policy == "split":
        return []
    own = set(split.video_ids())
    if policy == "auto" and (annotation_format in BENCHMARK_FORMATS or len(own) >= MIN_GALLERY):
        return []
    ids = [*pool.video_ids(), *(extra_video_ids or [])]
    return [v for v in dict.fromkeys(ids) if v not in own]


def _slice(gallery: VideoEmbedding, index: slice | torch.Tensor) -> VideoEmbedding:
    return VideoEmbedding(gallery.clips[index], gallery.video[index])


def encode_gallery(model: MamFusion, data: SplitData, batch_size: int) -> VideoEmbedding:
    """Every video of the split, encoded once in file-order batches (Gaussian scales follow the padding)."""
    device = next(model.parameters()).device
    parts = [model.encode_videos(b.to(device)) for b in video_batches(data, model.config, batch_size)]
    return VideoEmbedding(torch.cat([p.clips for p in parts]), torch.cat([p.video for p in parts]))


def encode_queries(model: MamFusion, data: SplitData, batch_size: int) -> torch.Tensor:
    """All queries of the split, (Q, d)."""
    device = next(model.parameters()).device
    return torch.cat(
        [model.encode_queries(b.to(device)) for b in query_batches(data, model.config, batch_size)]
    )


def rank_queries(
    model: MamFusion,
    queries: torch.Tensor,
    gallery: VideoEmbedding,
    positives: list[list[int]],
    *,
    query_bsz: int = 50,
    gallery_chunk: int = 2048,
    top_k: int = 10,
) -> RankOutput:
    """Rank every query against the whole gallery with batched matrix work only (no per-query loop)."""
    n_videos = len(gallery)
    k = min(top_k, n_videos)
    out: dict[str, list[torch.Tensor]] = {f: [] for f in RankOutput.__dataclass_fields__}
    for qs in range(0, queries.shape[0], query_bsz):
        q = queries[qs : qs + query_bsz]
        scores = torch.cat(
            [
                model.score(q, _slice(gallery, slice(v, v + gallery_chunk)))
                for v in range(0, n_videos, gallery_chunk)
            ],
            dim=1,
        ).float()
        positive = positive_mask(positives[qs : qs + query_bsz], n_videos, scores.device)
        best_positive = scores.masked_fill(~positive, float("-inf")).argmax(dim=1)
        own = _slice(gallery, best_positive)
        _, clips = model.score_with_moments(q, own)
        profile = torch.einsum(
            "qd,qnd->qn", F.normalize(q.float(), dim=-1), F.normalize(own.clips.float(), dim=-1)
        )
        top = scores.topk(k, dim=1)
        pessimistic, optimistic = rank_bounds(scores, positive)
        for name, value in (
            ("ranks", pessimistic),
            ("optimistic", optimistic),
            ("top_index", top.indices),
            ("top_score", top.values),
            ("best_positive", best_positive),
            ("best_clip", clips.diagonal()),
            ("best_profile", profile),
        ):
            out[name].append(value.cpu())
    return RankOutput(**{name: torch.cat(parts) for name, parts in out.items()})


def evaluate(
    model: MamFusion,
    data: SplitData,
    *,
    query_bsz: int = 50,
    context_bsz: int = 100,
    gallery_chunk: int = 2048,
    top_k: int = 10,
    details: bool = True,
    span_rule: SpanRule = SpanRule(),  # noqa: B008 (frozen)
) -> EvalResult:
    """R@1/5/10/100 and SumR on `data` (gallery = all its videos); `details` adds the per-query records."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        gallery = encode_gallery(model, data, context_bsz)
        queries = encode_queries(model, data, query_bsz)
        check_finite(data, gallery, queries)
        ranked = rank_queries(
            model,
            queries,
            gallery,
            data.positives(),
            query_bsz=query_bsz,
            gallery_chunk=gallery_chunk,
            top_k=top_k,
        )
    model.train(was_training)
    ranks = ranked.ranks.numpy()
    metrics = summarize(
        ranks,
        ranked.optimistic.numpy(),
        split=data.name,
        n_videos=len(data.video_ids),
        n_positives=[len(p) for p in data.positives()],
        n_distractors=data.n_distractors,
    ).model_copy(update={"moments": _moments(data, ranked, model.config.map_size, span_rule)})
    records = per_query_records(data, ranked, model.config.map_size, span_rule) if details else []
    return EvalResult(metrics, ranks, records)


def _has_span(q: QueryRecord) -> bool:
    return q.start is not None and q.end is not None and q.end > q.start


def _moments(data: SplitData, ranked: RankOutput, n_clips: int, rule: SpanRule) -> MomentMetrics | None:
    """Moment metrics over the queries whose annotation has a span (None when none has)."""
    picked = [i for i, q in enumerate(data.queries) if _has_span(q)]
    if not picked:
        return None
    spans = _ClipSpans(data, n_clips)
    return moment_metrics(
        [(data.queries[i].start, data.queries[i].end) for i in picked],
        [float(data.video_times[int(ranked.best_positive[i])][-1, 1]) for i in picked],
        [(ranked.best_profile[i].numpy(), spans[int(ranked.best_positive[i])]) for i in picked],
        [int(ranked.ranks[i]) == 1 for i in picked],
        rule,
    )


class _ClipSpans(dict):
    """Per gallery index, its (n_clips, 2) clip spans in seconds, computed once."""

    def __init__(self, data: SplitData, n_clips: int) -> None:
        super().__init__()
        self.data, self.n_clips = data, n_clips

    def __missing__(self, v: int) -> np.ndarray:
        self[v] = clip_spans(self.data.video_times[v], self.n_clips).numpy()
        return self[v]


def check_finite(data: SplitData, gallery: VideoEmbedding, queries: torch.Tensor) -> None:
    """Refuse to rank when any embedding is NaN/inf: such a score would order videos arbitrarily."""
    bad_videos = (
        ~torch.isfinite(gallery.clips).flatten(1).all(1) | ~torch.isfinite(gallery.video).all(1)
    ).nonzero()
    bad_queries = (~torch.isfinite(queries).all(1)).nonzero()
    if len(bad_videos) or len(bad_queries):
        videos = [data.video_ids[i] for i in bad_videos.flatten().tolist()]
        texts = [data.queries[i].query_id for i in bad_queries.flatten().tolist()]
        raise NonFiniteScoreError(
            f"split {data.name}: the model gives non-finite embeddings for {len(videos)} of "
            f"{len(data.video_ids)} videos ({', '.join(videos[:5]) or 'none'}) and {len(texts)} of "
            f"{len(data.queries)} queries ({', '.join(texts[:5]) or 'none'}); the weights have diverged or "
            "the features are damaged (`mamfusion store verify`)"
        )


def per_query_records(data: SplitData, ranked: RankOutput, n_clips: int, rule: SpanRule) -> list[dict]:
    """JSON-ready rows: rank, top-k video ids with scores, and the matching moment of the correct video
    (the rule's span, the single best clip, and the clip-score profile both come from)."""
    records = []
    spans = _ClipSpans(data, n_clips)
    for i, q in enumerate(data.queries):
        v = int(ranked.best_positive[i])
        profile = ranked.best_profile[i].numpy()
        clip = int(ranked.best_clip[i])
        start, end = localize(profile, spans[v], rule)
        record = {
            "query_id": q.query_id,
            "text": q.text,
            "video_id": q.video_id,
            "rank": int(ranked.ranks[i]),
            "rank_if_ties_won": int(ranked.optimistic[i]),
            "top_video_ids": [data.video_ids[j] for j in ranked.top_index[i].tolist()],
            "top_scores": [round(s, 6) for s in ranked.top_score[i].tolist()],
            "moment": {"video_id": data.video_ids[v], "start": start, "end": end},
            "best_clip": {
                "video_id": data.video_ids[v],
                "clip": clip,
                "start": float(spans[v][clip, 0]),
                "end": float(spans[v][clip, 1]),
            },
            "profile": [round(x, 5) for x in profile.tolist()],
            "clip_spans": spans[v].round(3).tolist(),
            "gt_start": q.start,
            "gt_end": q.end,
        }
        if _has_span(q):
            record["iou"] = round(temporal_iou((start, end), (q.start, q.end)), 4)  # type: ignore[arg-type]
        records.append(record)
    return records


def write_per_query(path: str | Path, records: list[dict]) -> None:
    """One JSON object per line, in query order."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def evaluate_saved_run(
    model_dir: ModelDir,
    annotations: AnnotationSet,
    *,
    name: str,
    store_url: str | None = None,
    distractors: list[str] | None = None,
    details: bool = True,
) -> tuple[EvalResult, SplitData]:
    """A saved model on `annotations` with the features it was trained on; opens nothing for writing."""
    features = model_dir.read_features()
    store = FeatureStore(store_url or features.store, read_only=True)
    data = load_split(
        store,
        annotations,
        None,
        features.visual.fingerprint,
        features.text.fingerprint,
        name=name,
        distractors=distractors or [],
    )
    model = MamFusion.from_pretrained(model_dir.path).to(resolve_device("auto"))
    data.check_dims(model.config)
    train = model_dir.read_experiment().train
    sizes = {"query_bsz": train.eval_query_bsz, "context_bsz": train.eval_context_bsz}
    return evaluate(model, data, details=details, **sizes), data
