"""The `mamfusion` flows: the full pipeline, and retraining when new videos arrive.

    scan catalog ─► ask the store ─► extract visual (per missing video, bounded) ─► text features ─► train
                 ─► evaluate champion ─► publish (champion/challenger) ─► build search index

Videos the feature store already holds (same content, same extractor fingerprint) are counted as cached by
one store read, without a task run each: a re-run of an unchanged folder costs a handful of task runs.

Both deployments (`mamfusion/full-pipeline`, `mamfusion/retrain-on-new-videos`) run `run_pipeline`; the
retrain flow first compares the folder with the catalog of the last successful run and returns at once when
nothing is new. Tasks exchange paths, ids and small dicts only. Task runner: threads by default; Dask when
MAMFUSION_DASK_ADDRESS names a scheduler (or `dask_task_runner()` is passed to `with_options`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.logs import quiet
from flows.params import DEMO_ROOT, PipelineParams
from storage.catalog import sha256_file, write_text_atomic
from storage.errors import MamFusionError
from storage.mssl import MsslFormatError, locate_bundle
from storage.registry import (
    ModelDir,
    ModelRegistry,
    RecallTable,
    RetrievalMetrics,
    RunDir,
    Skipped,
    new_version,
)
from tasks.extract import ExtractOutcome
from tasks.metrics import describe_gallery, format_metrics
from tasks.profiles import FeatureProfile, feature_profile, visual_fingerprint
from tasks.publish import PublishOutcome
from tasks.train import TrainRequest
from tasks.wrappers import (
    ScanOutcome,
    build_index_task,
    demo_corpus_task,
    evaluate_model_task,
    extract_text_task,
    extract_video_task,
    import_mssl_task,
    publish_task,
    scan_catalog_task,
    stored_under,
    stored_videos_task,
    train_task,
)

FLOW_NAME = "mamfusion"
DEMO_VIDEOS = 48
MAX_THREADS = 32  # the runner's cap; `extract_concurrency` bounds extraction below it


class NoUsableVideosError(MamFusionError, RuntimeError):
    """Nothing to train on: the folder has no video, or every video was skipped."""


def dask_task_runner(address: str | None = None, n_workers: int = 2) -> TaskRunner:
    """A Dask runner: an existing scheduler at `address`, else a temporary local cluster of processes."""
    from prefect_dask import DaskTaskRunner  # optional extra `mamfusion[dask]`

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "processes": True, "threads_per_worker": 1})


def default_task_runner() -> TaskRunner:
    address = os.environ.get("MAMFUSION_DASK_ADDRESS")
    return dask_task_runner(address) if address else ThreadPoolTaskRunner(max_workers=MAX_THREADS)


@dataclass(frozen=True)
class Layout:
    """Where a pipeline's outputs live under `output`."""

    output: Path

    @property
    def catalog(self) -> Path:  # the latest scan
        return self.output / "catalog.json"

    @property
    def baseline(self) -> Path:  # the catalog the current models were trained on
        return self.output / "trained-catalog.json"

    @property
    def trained(self) -> Path:  # what else the last successful run used (annotation digests)
        return self.output / "trained.json"

    @property
    def results(self) -> Path:  # Prefect's persisted task results: the cache records
        return self.output / "prefect-results"

    @property
    def runs(self) -> Path:
        return self.output / "runs"

    @property
    def models(self) -> Path:
        return self.output / "models"


@flow(name=FLOW_NAME, task_runner=default_task_runner(), description="scan, extract, train, publish, index")
def full_pipeline(params: PipelineParams) -> dict[str, Any]:
    return run_pipeline(params, only_if_new=False)


@flow(name=FLOW_NAME, task_runner=default_task_runner(), description="retrain only when the folder changed")
def retrain_on_new_videos(params: PipelineParams) -> dict[str, Any]:
    return run_pipeline(params, only_if_new=True)


@dataclass(frozen=True)
class PipelineData:
    """What training needs from the extraction (or import) step, and what it skipped."""

    annotations: str
    val_annotations: str | None
    annotation_format: str | None
    visual_fp: str
    text_fp: str
    skipped: list[Skipped]
    digest: str  # of the videos (ids, content), caption files and extractors: keys the run
    gallery: tuple[str, ...] = ()  # every usable catalogued video, distractors for small test galleries
    extracted: tuple[str, ...] = ()
    cached: tuple[str, ...] = ()
    notes: tuple[
        Skipped, ...
    ] = ()  # used, but worth a look: low-fps videos, captions whose moment was dropped


def run_pipeline(params: PipelineParams, *, only_if_new: bool) -> dict[str, Any]:
    """The pipeline body shared by both flows (runs inside a flow run)."""
    quiet()  # in a worker's flow-run process too
    log = get_run_logger()
    params = params.resolved()
    layout = Layout(Path(params.output))
    layout.output.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(layout.models)
    store = params.store
    profile = feature_profile(
        params.profile, visual={"device": params.device}, text={"device": params.device}
    )
    scan: ScanOutcome | None = None
    if params.mssl is not None:
        data = _import_bundle(params, layout, store)
    else:
        _ensure_demo_corpus(params)
        scan = scan_catalog_task(params.videos, str(layout.catalog), str(layout.baseline))
        digests = _annotation_digests(params.annotations, params.val_annotations)
        if only_if_new and _nothing_new(layout, registry, scan, digests):
            log.info("nothing new under %s since the last run: no extraction, no training", params.videos)
            return {"status": "nothing-new", "current": registry.current_version()}
        log.info(
            "catalog: %d readable, %d unreadable; new %d, changed %d, removed %d",
            len(scan.readable),
            len(scan.skipped),
            len(scan.new),
            len(scan.changed),
            len(scan.removed),
        )
        data = _extract(params, layout, scan, json.loads(profile.model_dump_json()), store, digests)

    cfg = params.experiment()
    run_key = _digest({"config": cfg.model_dump(mode="json"), "data": data.digest})[:16]
    request = TrainRequest(
        config=cfg,
        store=store,
        annotations=data.annotations,
        run_dir=str(layout.runs / run_key),
        val_annotations=data.val_annotations,
        annotation_format=data.annotation_format,
        visual_fingerprint=data.visual_fp,
        text_fingerprint=data.text_fp,
        extra_gallery=data.gallery,
    )
    trained = stored_under(train_task, layout.results)(request, data.digest)
    challenger = trained.metrics
    log.info("challenger %s", format_metrics(challenger).replace("\n", "; "))
    for warning in challenger.training.warnings:
        log.warning("model selection: %s", warning)
    champion = _evaluate_champion(layout, registry, request, challenger.split, data.digest)
    version = new_version(str(flow_run.id or uuid.uuid4()))
    outcome = publish_task(trained.run_dir, str(layout.models), version, challenger, request, champion)
    log.info("publish: %s", outcome.reason)
    index = None
    if scan is not None:
        if params.build_index:
            index = build_index_task(str(layout.models / outcome.current), store, scan.catalog)
            log.info(
                "index %s: %d added, %d removed, %d kept",
                index.index_url,
                len(index.added),
                len(index.removed),
                index.kept,
            )
        _accept_baseline(layout, digests)
    model = registry.model(outcome.version or outcome.current)
    _artifacts(outcome, model, challenger, data.skipped, list(data.notes))
    return {
        "status": "published" if outcome.published else "unchanged",
        "version": outcome.version,
        "promoted": outcome.promoted,
        "reason": outcome.reason,
        "current": outcome.current,
        "model_dir": str(model.path),
        "report": str(model.report_file),
        "metrics": challenger.model_dump(mode="json"),
        "extracted": list(data.extracted),
        "cached": list(data.cached),
        "skipped": [s.model_dump() for s in data.skipped],
        "notes": [n.model_dump() for n in data.notes],
        "index": None if index is None else index.to_dict(),
    }


# ------------------------------------------------------------------------------------------------- steps
def _ensure_demo_corpus(params: PipelineParams) -> None:
    """`demo: true`: make the default demo corpus if it is absent (never for a production run)."""
    if params.demo and not Path(params.videos).is_dir():
        get_run_logger().info("no videos at %s: generating the demo corpus", params.videos)
        demo_corpus_task(str(Path(DEMO_ROOT).absolute() / "corpus"), DEMO_VIDEOS)


def _annotation_digests(annotations: str, val_annotations: str | None) -> dict[str, str | None]:
    return {
        "annotations": sha256_file(annotations),
        "val_annotations": sha256_file(val_annotations) if val_annotations else None,
    }


def _nothing_new(
    layout: Layout, registry: ModelRegistry, scan: ScanOutcome, digests: dict[str, str | None]
) -> bool:
    """Same videos and captions as the last successful run, and a current model to serve them."""
    if scan.new or scan.changed or scan.removed or registry.current_version() is None:
        return False
    return layout.trained.is_file() and json.loads(layout.trained.read_text()) == digests


def _accept_baseline(layout: Layout, digests: dict[str, str | None]) -> None:
    """After a successful run: later scans count videos as new relative to this catalog."""
    write_text_atomic(layout.baseline, layout.catalog.read_text())
    write_text_atomic(layout.trained, json.dumps(digests))


def _extract(
    params: PipelineParams,
    layout: Layout,
    scan: ScanOutcome,
    profile: dict[str, Any],
    store: str,
    digests: dict[str, str | None],
) -> PipelineData:
    """Visual features of the videos the store lacks (at most `extract_concurrency` at a time), then the
    captions' features. Videos already stored count as cached without a task run each."""
    log = get_run_logger()
    skipped = list(scan.skipped)
    videos = scan.readable
    if not videos:
        raise NoUsableVideosError(_no_usable_message(params.videos, skipped))
    done: dict[str, list[str]] = {"extracted": [], "cached": []}
    usable: dict[str, str] = {}
    notes: list[Skipped] = []

    def record(video: dict[str, Any], outcome: ExtractOutcome, status: str) -> None:
        done[status].append(video["video_id"])
        usable[video["video_id"]] = video["sha256"]
        if outcome.note:
            notes.append(Skipped(kind="note", id=video["path"], reason=outcome.note))

    stored = stored_videos_task(videos, profile, store)
    todo = [video for video, outcome in zip(videos, stored, strict=True) if outcome is None]
    for video, outcome in zip(videos, stored, strict=True):
        if outcome is not None:
            record(video, outcome, "cached")
    first = len(videos) - len(todo)  # the position of the first video to extract
    progress = create_progress_artifact(
        100.0 * first / len(videos),
        key="mamfusion-extraction",
        description=f"visual features of {len(videos)} videos",
    )
    log.info(
        "extraction: %d of %d videos already in the store, %d to extract",
        *map(len, (done["cached"], videos, todo)),
    )
    milestones = {first + 1, len(videos), *(first + round(len(todo) * i / 10) for i in range(1, 10))}
    outcomes = _bounded(
        stored_under(extract_video_task, layout.results),
        todo,
        params.extract_concurrency,
        lambda v: {"video": v, "profile": profile, "store": store},
    )
    for n, (video, state) in enumerate(outcomes, first + 1):
        if state.is_completed():
            outcome = state.result()
            if outcome.status == "skipped":
                skipped.append(Skipped(kind="video", id=video["path"], reason=outcome.reason or "skipped"))
            else:  # a Prefect cache hit replays the first run's outcome: it did no work this time
                record(video, outcome, "cached" if state.name == "Cached" else outcome.status)
        else:
            reason = f"failed after retries: {state.message}"
            skipped.append(Skipped(kind="video", id=video["path"], reason=reason))
        update_progress_artifact(progress, 100.0 * n / len(videos))
        if n in milestones:  # about ten lines whatever the folder size, each naming where it is
            log.info(
                "extraction %d/%d videos: %d extracted, %d cached, %d skipped (last: %s)",
                n,
                len(videos),
                len(done["extracted"]),
                len(done["cached"]),
                len(skipped) - len(scan.skipped),
                video["video_id"],
            )
    log.info("videos: %d extracted, %d cached, %d skipped", *map(len, (*done.values(), skipped)))
    if not usable:
        raise NoUsableVideosError(_no_usable_message(params.videos, skipped))
    extract_text = stored_under(extract_text_task, layout.results)
    fmt = params.annotation_format
    state = extract_text(params.annotations, digests["annotations"], fmt, profile, store, return_state=True)
    text = state.result()
    if state.name == "Cached":
        log.info("captions: unchanged since an earlier run, nothing encoded")
    else:
        log.info("captions: %d encoded, %d already in the store", text.encoded, text.cached)
    visual_fp = visual_fingerprint(FeatureProfile.model_validate(profile).visual)
    return PipelineData(
        annotations=params.annotations,
        val_annotations=params.val_annotations,
        annotation_format=fmt,
        visual_fp=visual_fp,
        text_fp=text.fingerprint,
        skipped=skipped + list(text.skipped),
        digest=_digest(
            {
                "videos": sorted(usable.items()),
                "annotations": digests,
                "extractors": [visual_fp, text.fingerprint],
            }
        ),
        gallery=tuple(sorted(usable)),
        extracted=tuple(done["extracted"]),
        cached=tuple(done["cached"]),
        notes=(*notes, *text.notes),
    )


def _import_bundle(params: PipelineParams, layout: Layout, store: str) -> PipelineData:
    """MS-SL: features come from the bundle; train on its train captions, select on val (else test)."""
    src = params.mssl
    bundle = locate_bundle(src.root, src.collection, src.feature)
    report = stored_under(import_mssl_task, layout.results)(
        src.root, src.collection, src.feature, src.seconds_per_row, store
    )
    val = bundle.captions.get("val") or bundle.captions.get("test")
    if "train" not in bundle.captions or val is None:
        raise MsslFormatError(
            f"MS-SL bundle {bundle.collection_dir}: training needs train and val (or test) captions"
        )
    skipped = [Skipped(kind="video", id=s["video_id"], reason=s["reason"]) for s in report["videos_skipped"]]
    skipped += [
        Skipped(kind="caption", id=s["query_id"], reason=s["reason"]) for s in report["queries_skipped"]
    ]
    files = {split: sha256_file(path) for split, path in bundle.captions.items()}
    return PipelineData(
        annotations=str(bundle.captions["train"]),
        val_annotations=str(val),
        annotation_format="mssl",
        visual_fp=report["visual_fingerprint"],
        text_fp=report["text_fingerprint"],
        skipped=skipped,
        digest=_digest({"mssl": src.model_dump(), "captions": files, "imported": report["videos_imported"]}),
    )


def _evaluate_champion(
    layout: Layout, registry: ModelRegistry, request: TrainRequest, split: str, data_digest: str
) -> tuple[str, RetrievalMetrics] | None:
    """The current model's metrics on the challenger's split and gallery (None before the first publish).

    Computed before publishing so Prefect caches it; `publish` re-evaluates under its lock if another run
    changed `current` in between.
    """
    champion = registry.current()
    if champion is None or champion.same_training(RunDir(request.run_dir)):
        return None  # nothing to compare: first publish, or an identical challenger that publishes nothing
    evaluate = stored_under(evaluate_model_task, layout.results)
    metrics = evaluate(str(champion.path), request, split, data_digest)
    get_run_logger().info("champion %s %s", champion.version, format_metrics(metrics).replace("\n", "; "))
    return champion.version, metrics


# ------------------------------------------------------------------------------------------------ helpers
def _bounded(
    task: Task, items: list[dict[str, Any]], limit: int, kwargs: Callable[[dict[str, Any]], dict[str, Any]]
) -> Iterator[tuple[dict[str, Any], State]]:
    """Submit `task` per item with at most `limit` in flight; yield (item, final state) in submission order.

    Waiting on the oldest run only (no completion callbacks) works the same on every task runner.
    """
    running: deque[tuple[PrefectFuture, dict[str, Any]]] = deque()
    for item in [*items, None]:
        if item is not None:
            running.append((task.submit(**kwargs(item)), item))
        while running and (len(running) >= limit or item is None):
            future, done = running.popleft()
            future.wait()
            yield done, future.state


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _no_usable_message(videos: str | None, skipped: list[Skipped]) -> str:
    if not skipped:
        return f"no usable videos: no video files found under {videos}"
    first = "; ".join(f"{Path(s.id).name}: {s.reason}" for s in skipped[:3])
    return f"no usable videos under {videos}: all {len(skipped)} were skipped ({first})"


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+\.png)\)")


def _inline_plots(markdown: str, base: Path) -> str:
    """Embed the report's PNG plots as data URIs, so the Prefect UI shows them without file access."""

    def embed(m: re.Match[str]) -> str:
        path = base / m.group(2)
        if not path.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return _IMAGE.sub(embed, markdown)


def _artifacts(
    outcome: PublishOutcome,
    model: ModelDir,
    challenger: RetrievalMetrics,
    skipped: list[Skipped],
    notes: list[Skipped],
) -> None:
    """Metrics table (with gallery and chance), the report (plots inline), skipped items, the model link."""
    rows = [
        {"row": "challenger", **_metric_cells(challenger.table())},
        {"row": "chance (random ranking)", **_metric_cells(challenger.chance)},
    ]
    record = outcome.record
    if record is not None and record.champion_sumr is not None:
        rows.append({"row": f"champion {record.champion_version}", "sumr": round(record.champion_sumr, 2)})
    if challenger.moments is not None:
        m = challenger.moments
        for label, t in (("moment: span rule", m.span), ("moment: single clip", m.single_clip)):
            rows.append({"row": label, "mean_iou": round(t.mean_iou, 3), "r1_iou5": round(t.r1_iou5, 2)})
        rows.append({"row": "moment: chance", "mean_iou": round(m.chance.mean_iou, 3)})
    create_table_artifact(
        rows,
        key="mamfusion-metrics",
        description=f"R@K and SumR (percent) on {describe_gallery(challenger)}; {outcome.reason}",
    )
    if model.report_file.is_file():
        create_markdown_artifact(
            _inline_plots(model.report_file.read_text(), model.path),
            key="mamfusion-report",
            description=str(model.report_file),
        )
    create_table_artifact(
        [s.model_dump() for s in skipped] or [{"kind": "", "id": "", "reason": "nothing was skipped"}],
        key="mamfusion-skipped",
        description=f"{len(skipped)} skipped item(s) and why",
    )
    if notes:
        create_table_artifact(
            [n.model_dump() for n in notes],
            key="mamfusion-notes",
            description=f"{len(notes)} item(s) used with a caveat (low frame rate, moment dropped)",
        )
    state = "current" if outcome.current == model.version else "candidate"
    create_link_artifact(
        model.path.as_uri(), link_text=f"model {model.version} ({state})", key="mamfusion-model"
    )


def _metric_cells(table: RecallTable) -> dict[str, float]:
    return {k: round(v, 2) for k, v in table.model_dump().items()}
