"""The `mamfusion` flows: the full pipeline, and retraining when new videos arrive.

    scan catalog ─► extract visual (per video, bounded) ─► text features ─► train ─► evaluate champion
                 ─► publish (champion/challenger) ─► build search index

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

from flows.params import DEMO_ROOT, PipelineParams
from storage.catalog import sha256_file, write_text_atomic
from storage.errors import MamFusionError
from storage.mssl import locate_bundle
from tasks.profiles import feature_profile, visual_fingerprint
from tasks.publish import new_version, read_current
from tasks.wrappers import (
    build_index_task,
    demo_corpus_task,
    evaluate_model_task,
    extract_text_task,
    extract_video_task,
    import_mssl_task,
    publish_task,
    scan_catalog_task,
    stored_under,
    train_task,
)

FLOW_NAME = "mamfusion"
DEMO_VIDEOS = 48
MAX_THREADS = 32  # the runner's cap; `extract_concurrency` bounds extraction below it
METRIC_KEYS = ("r1", "r5", "r10", "r100", "sumr")


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
def full_pipeline(params: PipelineParams = PipelineParams()) -> dict[str, Any]:  # noqa: B008
    return run_pipeline(params, only_if_new=False)


@flow(name=FLOW_NAME, task_runner=default_task_runner(), description="retrain only when the folder changed")
def retrain_on_new_videos(params: PipelineParams = PipelineParams()) -> dict[str, Any]:  # noqa: B008
    return run_pipeline(params, only_if_new=True)


def run_pipeline(params: PipelineParams, *, only_if_new: bool) -> dict[str, Any]:
    """The pipeline body shared by both flows (runs inside a flow run)."""
    log = get_run_logger()
    params = params.resolved()
    layout = Layout(Path(params.output))
    layout.output.mkdir(parents=True, exist_ok=True)
    store = params.store
    profile = feature_profile(
        params.profile, visual={"device": params.device}, text={"device": params.device}
    )
    if params.mssl is not None:
        data = _import_bundle(params, layout, store)
        scan = None
    else:
        _ensure_demo_corpus(params)
        scan = scan_catalog_task(params.videos, str(layout.catalog), str(layout.baseline))
        digests = _annotation_digests(params.annotations, params.val_annotations)
        if only_if_new and _nothing_new(layout, scan, digests):
            log.info("nothing new under %s since the last run: no extraction, no training", params.videos)
            return {"status": "nothing-new", "current": read_current(layout.models)}
        log.info(
            "catalog: %d readable, %d unreadable; new %d, changed %d, removed %d",
            len(scan["readable"]),
            len(scan["unreadable"]),
            *(len(scan[k]) for k in ("new", "changed", "removed")),
        )
        data = _extract(params, layout, scan, json.loads(profile.model_dump_json()), store, digests)
        data["visual_fp"] = visual_fingerprint(profile.visual)

    cfg = params.experiment()
    run_key = _digest({"config": cfg.model_dump(mode="json"), "data": data["digest"]})[:16]
    trained = stored_under(train_task, layout.results)(
        cfg.model_dump(mode="json"),
        store,
        data["annotations"],
        data["val_annotations"],
        str(layout.runs / run_key),
        data["visual_fp"],
        data["text_fp"],
        data["digest"],
        data["annotation_format"],
    )
    challenger = trained["metrics"]
    log.info("challenger on %s: %s", challenger["split"], _format(challenger))
    champion = _evaluate_champion(layout, store, data, challenger["split"])
    version = new_version(str(flow_run.id or uuid.uuid4()))
    decision = publish_task(trained["run_dir"], str(layout.models), version, challenger, champion)
    log.info("publish %s: %s", version, decision["reason"])
    current_dir = str(layout.models / decision["current"])
    index = None
    if scan is not None:
        if params.build_index:
            index = build_index_task(current_dir, store, scan["catalog"])
            log.info("index %s: %d added, %d kept", index["index_url"], index["added"], index["kept"])
        _accept_baseline(layout, digests)
    _artifacts(decision, challenger, champion, data["skipped"])
    return {
        "status": "published",
        "version": version,
        "promoted": decision["promoted"],
        "reason": decision["reason"],
        "current": decision["current"],
        "model_dir": decision["model_dir"],
        "report": str(Path(decision["model_dir"]) / "report.md"),
        "metrics": {k: challenger[k] for k in ("split", *METRIC_KEYS)},
        "extracted": data.get("extracted", []),
        "cached": data.get("cached", []),
        "skipped": data["skipped"],
        "index": index,
    }


# ------------------------------------------------------------------------------------------------- steps
def _ensure_demo_corpus(params: PipelineParams) -> None:
    """`prefect deployment run mamfusion/full-pipeline` as typed: make the default demo corpus if absent."""
    if params.is_default_demo() and not Path(params.videos).is_dir():
        get_run_logger().info("no videos at %s: generating the demo corpus", params.videos)
        demo_corpus_task(str(Path(DEMO_ROOT) / "corpus"), DEMO_VIDEOS)


def _annotation_digests(annotations: str, val_annotations: str | None) -> dict[str, str | None]:
    return {
        "annotations": sha256_file(annotations),
        "val_annotations": sha256_file(val_annotations) if val_annotations else None,
    }


def _nothing_new(layout: Layout, scan: dict[str, Any], digests: dict[str, str | None]) -> bool:
    """Same videos and captions as the last successful run, and a current model to serve them."""
    if scan["new"] or scan["changed"] or scan["removed"] or read_current(layout.models) is None:
        return False
    return layout.trained.is_file() and json.loads(layout.trained.read_text()) == digests


def _accept_baseline(layout: Layout, digests: dict[str, str | None]) -> None:
    """After a successful run: later scans count videos as new relative to this catalog."""
    write_text_atomic(layout.baseline, layout.catalog.read_text())
    write_text_atomic(layout.trained, json.dumps(digests))


def _extract(
    params: PipelineParams,
    layout: Layout,
    scan: dict[str, Any],
    profile: dict[str, Any],
    store: str,
    digests: dict[str, str | None],
) -> dict[str, Any]:
    """Visual features per video (at most `extract_concurrency` at a time), then the captions' features."""
    log = get_run_logger()
    skipped = [{"kind": "video", "item": u["path"], "reason": u["reason"]} for u in scan["unreadable"]]
    videos = scan["readable"]
    if not videos:
        raise NoUsableVideosError(_no_usable_message(params.videos, skipped))
    progress = create_progress_artifact(
        0.0, key="mamfusion-extraction", description=f"visual features of {len(videos)} videos"
    )
    done: dict[str, list[str]] = {"extracted": [], "cached": []}
    usable: dict[str, str] = {}
    outcomes = _bounded(
        stored_under(extract_video_task, layout.results),
        videos,
        params.extract_concurrency,
        lambda v: {"video": v, "profile": profile, "store": store},
    )
    for n, (video, state) in enumerate(outcomes, 1):
        if state.is_completed():
            outcome = state.result()
            if outcome["status"] == "skipped":
                skipped.append({"kind": "video", "item": video["path"], "reason": outcome["reason"]})
            else:  # a Prefect cache hit replays the first run's outcome: it did no work this time
                status = "cached" if state.name == "Cached" else outcome["status"]
                done[status].append(video["video_id"])
                usable[video["video_id"]] = video["sha256"]
        else:
            reason = f"failed after retries: {state.message}"
            skipped.append({"kind": "video", "item": video["path"], "reason": reason})
        update_progress_artifact(progress, 100.0 * n / len(videos))
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
        log.info("captions: %d encoded, %d already in the store", text["encoded"], text["cached"])
    skipped += [
        {"kind": "annotation", "item": s["path"], "reason": s["reason"]} for s in text["skipped_lines"]
    ]
    skipped += [{"kind": "caption", "item": s["text"], "reason": s["reason"]} for s in text["skipped"]]
    return {
        **done,
        "annotations": params.annotations,
        "val_annotations": params.val_annotations,
        "annotation_format": fmt,
        "text_fp": text["fingerprint"],
        "skipped": skipped,
        "digest": _digest({"videos": sorted(usable.items()), "annotations": digests}),
    }


def _import_bundle(params: PipelineParams, layout: Layout, store: str) -> dict[str, Any]:
    """MS-SL: features come from the bundle; train on its train captions, select on val (else test)."""
    src = params.mssl
    bundle = locate_bundle(src.root, src.collection, src.feature)
    report = stored_under(import_mssl_task, layout.results)(
        src.root, src.collection, src.feature, src.seconds_per_row, store
    )
    val = bundle.captions.get("val") or bundle.captions.get("test")
    if "train" not in bundle.captions or val is None:
        raise ValueError(
            f"MS-SL bundle {bundle.collection_dir}: training needs train and val (or test) captions"
        )
    skipped = [
        {"kind": "video", "item": s["video_id"], "reason": s["reason"]} for s in report["videos_skipped"]
    ]
    skipped += [
        {"kind": "caption", "item": s["query_id"], "reason": s["reason"]} for s in report["queries_skipped"]
    ]
    files = {split: sha256_file(path) for split, path in bundle.captions.items()}
    return {
        "annotations": str(bundle.captions["train"]),
        "val_annotations": str(val),
        "annotation_format": "mssl",
        "visual_fp": report["visual_fingerprint"],
        "text_fp": report["text_fingerprint"],
        "skipped": skipped,
        "digest": _digest(
            {"mssl": src.model_dump(), "captions": files, "imported": report["videos_imported"]}
        ),
    }


def _evaluate_champion(layout: Layout, store: str, data: dict[str, Any], split: str) -> dict[str, Any] | None:
    """The current model's metrics on the challenger's evaluation split (None before the first publish)."""
    version = read_current(layout.models)
    if version is None:
        return None
    file = data["val_annotations"] if split == "val" and data["val_annotations"] else data["annotations"]
    evaluate = stored_under(evaluate_model_task, layout.results)
    metrics = evaluate(
        str(layout.models / version), store, file, split, data["annotation_format"], data["digest"]
    )
    get_run_logger().info("champion %s on %s: %s", version, split, _format(metrics))
    return {"version": version, **metrics}


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


def _format(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {metrics[k]:.2f}" for k in METRIC_KEYS)


def _no_usable_message(videos: str | None, skipped: list[dict[str, str]]) -> str:
    if not skipped:
        return f"no usable videos: no video files found under {videos}"
    first = "; ".join(f"{Path(s['item']).name}: {s['reason']}" for s in skipped[:3])
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
    decision: dict[str, Any],
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    skipped: list[dict[str, str]],
) -> None:
    """Metrics table, the report (plots inline), skipped items and a link to the published model."""
    rows = [{"model": f"challenger {decision['version']}", "split": challenger["split"]}]
    rows[0] |= {k: round(challenger[k], 2) for k in METRIC_KEYS}
    if champion is not None:
        rows.append(
            {"model": f"champion {champion['version']}", "split": champion["split"]}
            | {k: round(champion[k], 2) for k in METRIC_KEYS}
        )
    create_table_artifact(rows, key="mamfusion-metrics", description="R@K and SumR (percent)")
    model_dir = Path(decision["model_dir"])
    report = model_dir / "report.md"
    if report.is_file():
        create_markdown_artifact(
            _inline_plots(report.read_text(), model_dir), key="mamfusion-report", description=str(report)
        )
    create_table_artifact(
        skipped or [{"kind": "", "item": "", "reason": "nothing was skipped"}],
        key="mamfusion-skipped",
        description=f"{len(skipped)} skipped item(s) and why",
    )
    create_link_artifact(
        model_dir.as_uri(),
        link_text=f"model {decision['version']} ({'current' if decision['promoted'] else 'candidate'})",
        key="mamfusion-model",
    )
