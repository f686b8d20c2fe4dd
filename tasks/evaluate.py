"""Text-to-video evaluation (MODEL_SPEC §10): encode the gallery once, then rank query chunks against it.

Scores are computed for `query_bsz` queries against `gallery_chunk` videos at a time, so the largest temporary
(queries x videos x clips) is bounded whatever the gallery size; only one (query chunk x gallery) block of
scalar scores is kept for ranking. Ranks use `tasks.metrics` (pessimistic ties, best positive counts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.config import ExperimentConfig
from models.mamfusion import MamFusion, VideoEmbedding
from models.preprocess import clip_spans
from storage.annotations import AnnotationSet
from storage.feature_store import FeatureStore
from storage.index import read_features_json
from tasks.data import SplitData, load_split, query_batches, video_batches
from tasks.device import resolve_device
from tasks.metrics import best_positive_ranks, positive_mask, recall_metrics

log = logging.getLogger(__name__)

EXPERIMENT = "experiment.json"  # the full ExperimentConfig of a run directory


@dataclass
class RankOutput:
    """Per query: rank of the best positive, top-k gallery indices/scores, best positive and its best clip."""

    ranks: torch.Tensor  # (Q,) long
    top_index: torch.Tensor  # (Q, k) long
    top_score: torch.Tensor  # (Q, k)
    best_positive: torch.Tensor  # (Q,) long, gallery index
    best_clip: torch.Tensor  # (Q,) long, clip index inside best_positive


@dataclass
class EvalResult:
    """Metrics (percent) plus the per-query detail written to eval/per_query.jsonl."""

    metrics: dict[str, float]
    ranks: np.ndarray
    per_query: list[dict]


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
        _, clips = model.score_with_moments(q, _slice(gallery, best_positive))
        top = scores.topk(k, dim=1)
        for name, value in (
            ("ranks", best_positive_ranks(scores, positive)),
            ("top_index", top.indices),
            ("top_score", top.values),
            ("best_positive", best_positive),
            ("best_clip", clips.diagonal()),
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
) -> EvalResult:
    """R@1/5/10/100 and SumR on `data` (gallery = all its videos); `details` adds the per-query records."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        gallery = encode_gallery(model, data, context_bsz)
        queries = encode_queries(model, data, query_bsz)
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
    metrics = recall_metrics(ranks) | {"n_videos": len(data.video_ids)}
    return EvalResult(
        metrics, ranks, per_query_records(data, ranked, model.config.map_size) if details else []
    )


def per_query_records(data: SplitData, ranked: RankOutput, n_clips: int) -> list[dict]:
    """JSON-ready rows: rank, top-k video ids with scores, and the matching moment of the correct video."""
    records = []
    spans: dict[int, np.ndarray] = {}
    for i, q in enumerate(data.queries):
        v = int(ranked.best_positive[i])
        if v not in spans:
            spans[v] = clip_spans(data.video_times[v], n_clips).numpy()
        clip = int(ranked.best_clip[i])
        records.append(
            {
                "query_id": q.query_id,
                "text": q.text,
                "video_id": q.video_id,
                "rank": int(ranked.ranks[i]),
                "top_video_ids": [data.video_ids[j] for j in ranked.top_index[i].tolist()],
                "top_scores": [round(s, 6) for s in ranked.top_score[i].tolist()],
                "best_clip": {
                    "video_id": data.video_ids[v],
                    "clip": clip,
                    "start": float(spans[v][clip, 0]),
                    "end": float(spans[v][clip, 1]),
                },
                "gt_start": q.start,
                "gt_end": q.end,
            }
        )
    return records


def write_per_query(path: str | Path, records: list[dict]) -> None:
    """One JSON object per line, in query order."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def evaluate_saved_run(
    model_dir: str | Path,
    annotations: AnnotationSet,
    *,
    name: str,
    store_url: str | None = None,
    details: bool = True,
) -> tuple[EvalResult, SplitData]:
    """Evaluate a saved run directory on `annotations` with the features it was trained on (features.json)."""
    out = Path(model_dir)
    features = read_features_json(out)
    store = FeatureStore(store_url or features["store"])
    data = load_split(
        store, annotations, None, features["visual_fingerprint"], features["text_fingerprint"], name=name
    )
    model = MamFusion.from_pretrained(out).to(resolve_device("auto"))
    data.check_dims(model.config)
    sizes = {}
    if (out / EXPERIMENT).exists():
        train = ExperimentConfig.model_validate_json((out / EXPERIMENT).read_text()).train
        sizes = {"query_bsz": train.eval_query_bsz, "context_bsz": train.eval_context_bsz}
    return evaluate(model, data, details=details, **sizes), data
