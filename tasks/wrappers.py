"""Prefect `@task` wrappers: caching, retries and persisted results around the plain functions in `tasks/`.

Each body only converts small, JSON-friendly inputs (paths, URLs, dicts) into the plain function's arguments
and its result back into a small dict, so task inputs hash stably across processes (never tensors or models,
which hash differently every time) and results stay tiny on disk.

Caching: `INPUTS + TASK_SOURCE` plus `CODE_VERSION`, an explicit version of the code the bodies call (editing
a helper does not change a task's source). Results are persisted (by default under $PREFECT_HOME/storage;
the flows use `stored_under(task, OUTPUT/prefect-results)`), so a later run in a new process reports the task
as Cached. The feature store is the durable cache behind it: with a fresh Prefect database or results folder,
extraction still skips every video the store already holds.

Retries: only transient failures (I/O, timeouts, a lost Dask worker) are retried, with exponential backoff.
Permanent ones (a corrupt video, a malformed annotation file, a bad config) fail at once.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

from models.config import ExperimentConfig
from storage.annotations import read_annotations
from storage.catalog import Catalog, VideoRecord, scan_videos
from storage.demo_corpus import generate_demo_corpus
from storage.feature_store import FeatureStore
from storage.mssl import import_mssl
from tasks.extract import VisualExtractor, extract_queries, extract_video
from tasks.profiles import EXTRACTOR_VERSION, FeatureProfile, VisualExtractorConfig
from tasks.publish import evaluate_model, publish
from tasks.search import build_index
from tasks.train import train_run

PIPELINE_VERSION = 1  # bump when a wrapped function changes what it returns or writes
CODE_VERSION = f"pipeline-{PIPELINE_VERSION}.extractor-{EXTRACTOR_VERSION}"
CACHE_POLICY = INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: CODE_VERSION)
RETRIES = 2
# Dask's name for "the worker running this task died"; matched by name so Dask stays optional.
_LOST_WORKER = {"KilledWorker"}
# OSErrors that retrying cannot fix.
_PERMANENT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_transient(exc: BaseException) -> bool:
    """I/O trouble, timeouts and lost workers may pass; everything else (bad input, bugs) will not."""
    if type(exc).__name__ in _LOST_WORKER:
        return True
    return isinstance(exc, OSError | TimeoutError) and not isinstance(exc, _PERMANENT_OS_ERRORS)


def retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """`retry_condition_fn`: the engine hands the failure over as `state.data`."""
    return isinstance(state.data, BaseException) and is_transient(state.data)


_RETRY = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}
_CACHED = {"cache_policy": CACHE_POLICY, "persist_result": True}


def stored_under(task: Task, results: Path) -> Task:
    """The same task with its results (the cache) in the folder `results`."""
    return task.with_options(result_storage=results)


@functools.lru_cache(maxsize=4)
def _extractor(config_json: str) -> VisualExtractor:
    """One extractor (and backbone) per config per process, shared by the threads extracting videos."""
    return VisualExtractor(VisualExtractorConfig.model_validate_json(config_json))


@task(name="demo-corpus", cache_policy=NO_CACHE)
def demo_corpus_task(out_dir: str, n_videos: int) -> dict[str, str]:
    corpus = generate_demo_corpus(out_dir, n_videos=n_videos)
    return {"videos": corpus.videos_dir, "annotations": corpus.annotations_path}


@task(name="scan-catalog", cache_policy=NO_CACHE, **_RETRY)
def scan_catalog_task(videos: str, catalog_path: str, baseline_path: str) -> dict[str, Any]:
    """Scan the folder against the catalog of the last successful run; save the new catalog."""
    baseline = Catalog.load(baseline_path) if Path(baseline_path).is_file() else None
    result = scan_videos(videos, baseline)
    result.catalog.save(catalog_path)
    return {
        "catalog": catalog_path,
        "new": result.new,
        "changed": result.changed,
        "removed": result.removed,
        "readable": [v.to_dict() for v in result.catalog.readable()],
        "unreadable": [{"path": v.path, "reason": v.error} for v in result.catalog.unreadable()],
    }


@task(name="extract-video", task_run_name="extract-{video[video_id]}", **_CACHED, **_RETRY)
def extract_video_task(video: dict[str, Any], profile: dict[str, Any], store: str) -> dict[str, Any]:
    """One catalogued video into the store (skipped there if present); `video` is `VideoRecord.to_dict()`."""
    record = VideoRecord(**{f.name: video[f.name] for f in fields(VideoRecord)})
    visual = FeatureProfile.model_validate(profile).visual
    return asdict(extract_video(record, _extractor(visual.model_dump_json()), FeatureStore(store)))


@task(name="extract-text", **_CACHED, **_RETRY)
def extract_text_task(
    annotations: str, annotations_sha256: str, fmt: str | None, profile: dict[str, Any], store: str
) -> dict[str, Any]:
    """Token features of every caption; `annotations_sha256` keys the cache on the file's content."""
    ann = read_annotations(annotations, fmt, skip_malformed=True)
    summary = extract_queries(
        [q.text for q in ann.queries], FeatureProfile.model_validate(profile), FeatureStore(store)
    )
    lines = [{"path": f"{s.path}:{s.line}", "reason": s.reason} for s in ann.skipped]
    return {**summary.to_dict(), "skipped_lines": lines, "video_ids": ann.video_ids()}


@task(name="import-mssl", **_CACHED, **_RETRY)
def import_mssl_task(root: str, collection: str, feature: str, seconds_per_row: float, store: str) -> dict:
    """Bundle features into the store (already present entries are skipped by the importer)."""
    report = import_mssl(root, collection, feature, FeatureStore(store), seconds_per_row=seconds_per_row)
    return report.to_dict()


@task(name="train", **_CACHED, **_RETRY)
def train_task(
    config: dict[str, Any],
    store: str,
    annotations: str,
    val_annotations: str | None,
    run_dir: str,
    visual_fp: str,
    text_fp: str,
    data_digest: str,
    annotation_format: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate the best epoch and write the run's report; a retry resumes from checkpoints/last.pt.

    `data_digest` (videos, their content and the captions) is only a cache-key input.
    """
    metrics = train_run(
        ExperimentConfig.model_validate(config),
        store,
        annotations,
        run_dir,
        val_annotations=val_annotations,
        annotation_format=annotation_format,
        visual_fp=visual_fp,
        text_fp=text_fp,
        resume=True,
        progress=False,
    )
    return {"run_dir": run_dir, "metrics": metrics}


@task(name="evaluate-champion", **_CACHED, **_RETRY)
def evaluate_model_task(
    model_dir: str, store: str, annotations: str, split: str, fmt: str | None, data_digest: str
) -> dict[str, Any]:
    """A published model (never overwritten, so its path keys the cache) on the challenger's split."""
    return evaluate_model(model_dir, store, annotations, split, fmt)


@task(name="publish", cache_policy=NO_CACHE, **_RETRY)
def publish_task(
    run_dir: str, models_dir: str, version: str, challenger: dict[str, Any], champion: dict[str, Any] | None
) -> dict[str, Any]:
    return publish(run_dir, models_dir, version, challenger, champion).to_dict()


@task(name="build-index", cache_policy=NO_CACHE, **_RETRY)
def build_index_task(model_dir: str, store: str, catalog_path: str) -> dict[str, Any]:
    """Bring the current model's index in line with the catalog (encodes only videos not indexed yet)."""
    summary = build_index(model_dir, store, catalog=Catalog.load(catalog_path))
    return {
        "index_url": summary.index_url,
        "added": len(summary.added),
        "removed": len(summary.removed),
        "kept": summary.kept,
        "skipped": summary.skipped,
    }
