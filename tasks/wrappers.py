"""Prefect `@task` wrappers: caching, retries and persisted results around the plain functions in `tasks/`.

Each body converts small typed inputs (paths, URLs, pydantic requests) into the plain function's arguments
and returns a small typed value, so task inputs hash stably across processes (never tensors or models,
which hash differently every time) and results stay tiny on disk.

Caching: `INPUTS + TASK_SOURCE` plus `code_digest(module)`: a sha256 over the source of the module a task
calls and every project module it imports, transitively. TASK_SOURCE alone hashes only the wrapper, so an
edit to `tasks/train.py` or an extractor would replay stale results; with the digest it cannot. Results are
persisted (by default under $PREFECT_HOME/storage; the flows use `stored_under(task,
OUTPUT/prefect-results)`), so a later run in a new process reports the task as Cached. The feature store
is the durable cache behind it: with a fresh Prefect database or results folder, extraction still skips
every video the store already holds. The flows ask the store first (`stored_videos_task`, one task run for
the folder) and submit `extract_video_task` only for videos it lacks, so Prefect's per-video cache answers
only for those (e.g. a video that failed to decode, which the store never holds).

Retries: only transient failures (I/O, timeouts, a lost Dask worker) are retried, with exponential backoff.
Permanent ones (a corrupt video, a malformed annotation file, a bad config) fail at once.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from dataclasses import fields
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task, exponential_backoff
from pydantic import BaseModel, ConfigDict

from storage.annotations import read_annotations
from storage.catalog import Catalog, VideoRecord, scan_videos
from storage.demo_corpus import generate_demo_corpus
from storage.feature_store import FeatureStore
from storage.mssl import import_mssl
from storage.registry import ModelDir, ModelRegistry, RetrievalMetrics, RunDir, RunMetrics, Skipped
from tasks.extract import (
    ExtractOutcome,
    VisualExtractor,
    extract_queries,
    extract_video,
    stored_outcomes,
)
from tasks.profiles import FeatureProfile, VisualExtractorConfig
from tasks.publish import PublishOutcome, evaluate_on_request, publish
from tasks.search import IndexSummary, build_index
from tasks.train import TrainRequest, train_run

RETRIES = 2
PROJECT_PACKAGES = frozenset({"tasks", "models", "storage"})
# Dask's name for "the worker running this task died"; matched by name so Dask stays optional.
_LOST_WORKER = {"KilledWorker"}
# OSErrors that retrying cannot fix.
_PERMANENT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _imports(path: Path, package: str) -> set[str]:
    """Project modules a source file imports (absolute and relative), by static reading only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parts, base]))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from storage import x` (a module)
    return {name for name in found if name.split(".")[0] in PROJECT_PACKAGES}


@functools.cache
def code_digest(module: str) -> str:
    """sha256 over the sources of `module` and every project module it imports, transitively, plus the
    C sources shipped beside them: the code a task actually runs."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ModuleNotFoundError, ValueError):  # `from storage.errors import X`: X is not a module
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        seen[name] = Path(spec.origin)
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        todo.extend(_imports(seen[name], package))
    files = sorted(set(seen.values()) | {c for p in seen.values() for c in p.parent.glob("*.c")})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def cache_policy(module: str) -> CachePolicy:
    """Inputs, the wrapper's source and the digest of the code behind it."""
    key = code_digest(module)
    return INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: key)


def _cached(module: str) -> dict[str, Any]:
    return {"cache_policy": cache_policy(module), "persist_result": True}


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


def stored_under(task: Task, results: Path) -> Task:
    """The same task with its results (the cache) in the folder `results`."""
    return task.with_options(result_storage=results)


@functools.lru_cache(maxsize=4)
def _extractor(config_json: str) -> VisualExtractor:
    """One extractor (and backbone) per config per process, shared by the threads extracting videos."""
    return VisualExtractor(VisualExtractorConfig.model_validate_json(config_json))


class ScanOutcome(BaseModel):
    """A folder scan: the saved catalog, what changed since the baseline, usable and skipped videos."""

    model_config = ConfigDict(frozen=True)

    catalog: str
    new: list[str]
    changed: list[str]
    removed: list[str]
    readable: list[dict[str, Any]]  # VideoRecord.to_dict(): JSON-friendly task inputs for extraction
    skipped: list[Skipped]


class TextOutcome(BaseModel):
    """Caption features: the text fingerprint, counts, and captions/lines that were skipped."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str
    encoded: int
    cached: int
    skipped: list[Skipped]
    notes: list[Skipped] = []  # captions kept whose moment was invalid (dropped or clipped)


class TrainOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_dir: str
    metrics: RunMetrics


@task(name="demo-corpus", cache_policy=NO_CACHE)
def demo_corpus_task(out_dir: str, n_videos: int) -> tuple[str, str]:
    """(videos folder, annotations file) of a generated demo corpus."""
    corpus = generate_demo_corpus(out_dir, n_videos=n_videos)
    return corpus.videos_dir, corpus.annotations_path


@task(name="scan-catalog", cache_policy=NO_CACHE, **_RETRY)
def scan_catalog_task(videos: str, catalog_path: str, baseline_path: str) -> ScanOutcome:
    """Scan the folder against the catalog of the last successful run; save the new catalog."""
    baseline = Catalog.load(baseline_path) if Path(baseline_path).is_file() else None
    result = scan_videos(videos, baseline)
    result.catalog.save(catalog_path)
    return ScanOutcome(
        catalog=catalog_path,
        new=result.new,
        changed=result.changed,
        removed=result.removed,
        readable=[v.to_dict() for v in result.catalog.readable()],
        skipped=[
            Skipped(kind="video", id=v.path, reason=v.error or "unreadable")
            for v in result.catalog.unreadable()
        ],
    )


def _record(video: dict[str, Any]) -> VideoRecord:
    return VideoRecord(**{f.name: video[f.name] for f in fields(VideoRecord)})


@task(name="stored-videos", cache_policy=NO_CACHE, **_RETRY)
def stored_videos_task(
    videos: list[dict[str, Any]], profile: dict[str, Any], store: str
) -> list[ExtractOutcome | None]:
    """Per catalogued video, its "cached" outcome if the store already holds its features, else None.

    One task run for the whole folder, so an unchanged folder costs no per-video task run; the flow submits
    `extract_video_task` for the None ones only. Never cached: the store's commit markers are the truth.
    """
    visual = FeatureProfile.model_validate(profile).visual
    return stored_outcomes([_record(v) for v in videos], visual, FeatureStore(store))


@task(name="extract-video", task_run_name="extract[{video[video_id]}]", **_cached("tasks.extract"), **_RETRY)
def extract_video_task(video: dict[str, Any], profile: dict[str, Any], store: str) -> ExtractOutcome:
    """One catalogued video into the store (skipped there if present); `video` is `VideoRecord.to_dict()`."""
    visual = FeatureProfile.model_validate(profile).visual
    return extract_video(_record(video), _extractor(visual.model_dump_json()), FeatureStore(store))


@task(name="extract-text", **_cached("tasks.extract"), **_RETRY)
def extract_text_task(
    annotations: str, annotations_sha256: str, fmt: str | None, profile: dict[str, Any], store: str
) -> TextOutcome:
    """Token features of every caption; `annotations_sha256` keys the cache on the file's content."""
    ann = read_annotations(annotations, fmt, skip_malformed=True)
    summary = extract_queries(
        [q.text for q in ann.queries], FeatureProfile.model_validate(profile), FeatureStore(store)
    )
    skipped = [Skipped(kind="annotation", id=f"{s.path}:{s.line}", reason=s.reason) for s in ann.skipped]
    skipped += [Skipped(kind="caption", id=s["text"], reason=s["reason"]) for s in summary.skipped]
    notes = [Skipped(kind="moment", id=f"{s.path}:{s.line}", reason=s.reason) for s in ann.moment_issues]
    return TextOutcome(
        fingerprint=summary.fingerprint,
        encoded=summary.encoded,
        cached=summary.cached,
        skipped=skipped,
        notes=notes,
    )


@task(name="import-mssl", **_cached("storage.mssl"), **_RETRY)
def import_mssl_task(root: str, collection: str, feature: str, seconds_per_row: float, store: str) -> dict:
    """Bundle features into the store (already present entries are skipped by the importer)."""
    report = import_mssl(root, collection, feature, FeatureStore(store), seconds_per_row=seconds_per_row)
    return report.to_dict()


@task(name="train", **_cached("tasks.train"), **_RETRY)
def train_task(request: TrainRequest, data_digest: str) -> TrainOutcome:
    """Train, evaluate the selected epoch and write the run; a retry resumes from its checkpoint.

    `data_digest` (videos, their content and the captions) is only a cache-key input.
    """
    say = get_run_logger().info  # per-epoch lines into the flow run's logs (terminal, UI, worker log)
    return TrainOutcome(run_dir=request.run_dir, metrics=train_run(request, progress=False, say=say))


@task(name="evaluate-champion", **_cached("tasks.publish"), **_RETRY)
def evaluate_model_task(
    model_dir: str, request: TrainRequest, split: str, data_digest: str
) -> RetrievalMetrics:
    """A published model (never overwritten, so its path keys the cache) on the challenger's split."""
    return evaluate_on_request(ModelDir(model_dir), request, split)


@task(name="publish", cache_policy=NO_CACHE, **_RETRY)
def publish_task(
    run_dir: str,
    models_dir: str,
    version: str,
    challenger: RetrievalMetrics,
    request: TrainRequest,
    champion: tuple[str, RetrievalMetrics] | None,
) -> PublishOutcome:
    """Champion/challenger under the registry lock; `champion` = (version, metrics) evaluated beforehand,
    reused when that version is still current once the lock is held, else the current one is evaluated."""

    def evaluate_champion(model: ModelDir) -> RetrievalMetrics:
        if champion is not None and champion[0] == model.version:
            return champion[1]
        return evaluate_on_request(model, request, challenger.split)

    return publish(RunDir(run_dir), ModelRegistry(models_dir), version, challenger, evaluate_champion)


@task(name="build-index", cache_policy=NO_CACHE, **_RETRY)
def build_index_task(model_dir: str, store: str, catalog_path: str) -> IndexSummary:
    """Bring the current model's index in line with the catalog (encodes only videos not indexed yet)."""
    return build_index(ModelDir(model_dir), store, catalog=Catalog.load(catalog_path))
