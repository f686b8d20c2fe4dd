"""End to end through a real Prefect server: deployments run as a user types them, then the API is inspected.

One server (temporary PREFECT_HOME, free loopback port), one worker and one small corpus serve the module; the
tests run in file order and build on each other's state (first run, cached rerun, retrain, worse challenger).
Corpus: 4 demo videos and the real videos of ../shared/realdata (corrupted.mp4 included). Every caption is in
train, val and test at once, so a trained model is measurably better than an untrained one on the test split.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from uuid import UUID

import pytest
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

import tasks.train as train_module
from flows.params import MsslSource, PipelineParams
from flows.pipeline import full_pipeline
from flows.server import down, free_port, run_deployment, up
from storage.catalog import scan_videos
from storage.demo_corpus import generate_demo_corpus
from storage.index import VideoIndex
from storage.registry import ModelRegistry
from tasks import wrappers
from tasks.decode import DecodeError
from tasks.extract import ExtractOutcome
from tasks.profiles import feature_profile
from tasks.train import TrainRequest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REAL_CAPTIONS = [  # ActivityNet Captions of the two real ActivityNet videos (../shared/realdata/README.md)
    ("v_GGSY1Qvo990", 0.0, 2.27, "A female weight lifter bends at the knees."),
    ("v_GGSY1Qvo990", 2.91, 6.54, "She lifts a barbell to her chest."),
    ("v_ZNVhz7ctTq0", 0.0, 1.97, "A fluffy dog is standing on a sidewalk with a child behind it."),
]
TRAIN = {"n_epoch": 3}
UNTRAINED = {"n_epoch": 1, "lr": 1e-12}


def write_captions(path: Path, rows: list[tuple[str, float, float, str]]) -> None:
    with open(path, "a", newline="") as f:
        out = csv.writer(f)
        if f.tell() == 0:
            out.writerow(["video_id", "start", "end", "caption", "split"])
        for split in ("train", "val", "test"):
            out.writerows([*row, split] for row in rows)


def demo_rows(corpus, prefix: str | None = None) -> list[tuple[str, float, float, str]]:
    rows = []
    for video in corpus.videos:
        vid = video.video_id if prefix is None else video.video_id.replace("demo", prefix)
        rows += [(vid, e.start, e.end, e.caption) for e in video.events]
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory, realdata):
    """Server + worker + deployments, and the corpus folder the deployments are pointed at."""
    root = tmp_path_factory.mktemp("e2e")
    videos = root / "videos"
    videos.mkdir()
    corpus = generate_demo_corpus(root / "demo", n_videos=4)
    for video in corpus.videos:
        shutil.copy(video.path, videos)
    for real in (realdata / "videos").iterdir():
        shutil.copy(real, videos)
    annotations = root / "captions.csv"
    write_captions(annotations, demo_rows(corpus) + REAL_CAPTIONS)
    local = up(root / "prefect", free_port(None), reuse=False)
    params = {
        "videos": str(videos),
        "annotations": str(annotations),
        "store": str(root / "features.zarr"),
        "output": str(root / "out"),
        "overrides": TRAIN,
    }
    try:
        # The retry tests call tasks outside a flow run, whose logs have no flow run to go to.
        quiet = {PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}
        with temporary_settings({PREFECT_API_URL: local.api_url, **quiet}):
            yield {
                "local": local,
                "params": params,
                "root": root,
                "videos": videos,
                "annotations": annotations,
            }
    finally:
        down(local.home)


def run(world, deployment: str = "full-pipeline", **changes):
    result = run_deployment(world["local"], f"mamfusion/{deployment}", world["params"] | changes)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(result.flow_run_id))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    return result, flow_run, tasks, {a.key: a for a in artifacts}


def extract_states(tasks) -> dict[str, str]:
    """Per video id, the final state name of its extraction task run."""
    return {t.name[len("extract[") : -1]: t.state.name for t in tasks if t.name.startswith("extract[")}


def task_states(flow_run_id: UUID) -> dict[str, str]:
    """Final state name per task run: `extract[<video id>]` by run name, the others by task name."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name if t.name.startswith("extract[") else t.name.rsplit("-", 1)[0]: t.state.name for t in runs}


def flow_logs(flow_run) -> list[str]:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    return [entry.message for entry in logs]


def table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def models_dir(world) -> Path:
    return Path(world["params"]["output"]) / "models"


def read_current(models: Path) -> str | None:
    return ModelRegistry(models).current_version()


def test_full_pipeline_through_the_deployment(world):
    result, flow_run, tasks, artifacts = run(world)
    assert result.completed, result.output
    assert flow_run.state.type.value == "COMPLETED"
    states = extract_states(tasks)
    assert set(states) >= {f"demo000{i}" for i in range(4)} | {"v_GGSY1Qvo990", "big_buck_bunny_vp8"}
    assert {k: v for k, v in states.items() if v != "Completed"} == {}
    assert {"mamfusion-metrics", "mamfusion-report", "mamfusion-skipped", "mamfusion-model"} <= set(artifacts)
    assert "mamfusion-extraction" in artifacts  # progress artifact, updated per video
    rows = {row["row"]: row for row in table(artifacts["mamfusion-metrics"])}
    assert 0 < rows["challenger"]["sumr"] <= 400 and rows["chance (random ranking)"]["sumr"] > 0
    assert "queries vs a gallery of" in artifacts["mamfusion-metrics"].description
    skipped = table(artifacts["mamfusion-skipped"])
    assert any(row["id"].endswith("corrupted.mp4") and row["reason"] for row in skipped), skipped
    version = read_current(models_dir(world))
    assert version is not None and (models_dir(world) / version / "report.md").is_file()
    assert "## Publishing" in (models_dir(world) / version / "report.md").read_text()
    assert (models_dir(world) / version / "index.zarr").is_dir()
    # what the user sees in the UI: per-epoch and extraction progress lines, no routine task chatter
    messages = flow_logs(flow_run)
    for epoch in range(1, TRAIN["n_epoch"] + 1):
        assert any(m.startswith(f"epoch {epoch}/{TRAIN['n_epoch']}: loss") for m in messages), messages
    assert any(m.startswith("extraction ") and "videos:" in m for m in messages), messages
    assert any(m.startswith("challenger split test:") for m in messages), messages
    assert not any(m.startswith("Finished in state Completed") for m in messages), messages


def test_second_run_extracts_nothing_publishes_nothing_and_indexes_nothing(world):
    versions = ModelRegistry(models_dir(world)).versions()
    current = ModelRegistry(models_dir(world)).current()
    index_before = VideoIndex.open(str(current.index_dir)).count
    result, flow_run, tasks, artifacts = run(world)
    assert result.completed, result.output
    # The store answers for every video in one task run: no extraction task run per video.
    assert extract_states(tasks) == {}
    assert [t.state.name for t in tasks if t.name.startswith("stored-videos")] == ["Completed"]
    readable = len(scan_videos(world["videos"]).catalog.readable())
    messages = flow_logs(flow_run)
    assert f"extraction: {readable} of {readable} videos already in the store, 0 to extract" in messages
    assert f"videos: 0 extracted, {readable} cached, 1 skipped" in messages  # corrupted.mp4
    assert {t.state.name for t in tasks if t.name.startswith("train")} == {"Cached"}
    skipped = table(artifacts["mamfusion-skipped"])
    assert any(row["id"].endswith("corrupted.mp4") for row in skipped)
    assert ModelRegistry(models_dir(world)).versions() == versions  # no duplicate model version
    assert read_current(models_dir(world)) == current.version
    assert VideoIndex.open(str(current.index_dir)).count == index_before  # nothing re-indexed
    assert "identical to the current model" in artifacts["mamfusion-metrics"].description


def test_retrain_with_nothing_new_trains_nothing(world):
    before = sorted(p.name for p in models_dir(world).iterdir())
    result, flow_run, tasks, _ = run(world, "retrain-on-new-videos")
    assert result.completed, result.output
    assert [t.name.rsplit("-", 1)[0] for t in tasks] == ["scan-catalog"]
    assert sorted(p.name for p in models_dir(world).iterdir()) == before


def test_retrain_extracts_only_the_new_videos(world, tmp_path):
    extra = generate_demo_corpus(tmp_path / "more", n_videos=2, seed=1)
    for video in extra.videos:
        shutil.copy(video.path, world["videos"] / Path(video.path).name.replace("demo", "new"))
    write_captions(world["annotations"], demo_rows(extra, prefix="new"))
    champion = read_current(models_dir(world))
    # The challenger is left untrained on purpose (next test: it must not replace the champion).
    world["retrain"] = run(world, "retrain-on-new-videos", overrides=UNTRAINED, build_index=False), champion
    (result, _, tasks, _), _ = world["retrain"]
    assert result.completed, result.output
    assert extract_states(tasks) == {"new0000": "Completed", "new0001": "Completed"}  # the rest is stored
    assert any(t.name.startswith("train") for t in tasks)


def test_worse_challenger_does_not_replace_the_champion(world):
    (result, _, _, artifacts), champion = world["retrain"]
    assert result.completed, result.output
    rows = {row["row"].split()[0]: row for row in table(artifacts["mamfusion-metrics"])}
    assert rows["challenger"]["sumr"] < rows["champion"]["sumr"], rows
    assert read_current(models_dir(world)) == champion
    registry = ModelRegistry(models_dir(world))
    newest = registry.model(registry.versions()[-1])
    decision = newest.read_publish()
    assert decision is not None and decision.promoted is False and decision.current == champion
    assert decision.n_videos >= 2 and decision.gallery.startswith("split test:")
    assert "kept as a candidate" in newest.report_file.read_text()


def test_stored_videos_cost_no_task_run_and_new_content_is_extracted_and_retrains(world, tmp_path):
    """In-process runs on a corpus of their own: what the store holds is reported cached without a task run
    per video; a file whose content changed under the same name is extracted again and retrains."""
    corpus = generate_demo_corpus(tmp_path / "corpus", n_videos=3)
    params = PipelineParams(
        videos=corpus.videos_dir,
        annotations=corpus.annotations_path,
        store=str(tmp_path / "features.zarr"),
        output=str(tmp_path / "out"),
        overrides={"n_epoch": 1},
        build_index=False,
    )

    def pipeline() -> tuple[dict, dict[str, str]]:
        state = full_pipeline(params, return_state=True)
        return state.result(), task_states(state.state_details.flow_run_id)

    ids = sorted(v.video_id for v in corpus.videos)
    first, tasks = pipeline()
    assert sorted(first["extracted"]) == ids and first["cached"] == []
    assert {tasks[f"extract[{v}]"] for v in ids} == {"Completed"}
    second, tasks = pipeline()
    assert second["extracted"] == [] and sorted(second["cached"]) == ids and second["status"] == "unchanged"
    assert not any(name.startswith("extract[") for name in tasks), tasks
    assert tasks["stored-videos"] == "Completed" and tasks["train"] == "Cached"

    edited = corpus.videos[0]
    other = generate_demo_corpus(tmp_path / "other", n_videos=1, seed=7).videos[0]
    shutil.copy(other.path, edited.path)  # new content, same file name (so the same video id)
    third, tasks = pipeline()
    assert third["extracted"] == [edited.video_id]
    assert sorted(third["cached"]) == [v for v in ids if v != edited.video_id]
    assert [name for name in tasks if name.startswith("extract[")] == [f"extract[{edited.video_id}]"]
    assert tasks["train"] == "Completed"  # the data digest changed: a new training run, not a replay
    assert third["status"] == "published"


def test_no_usable_videos_fails_with_one_clear_message(world, realdata, tmp_path):
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(realdata / "videos" / "corrupted.mp4", only_bad)
    result, flow_run, _, _ = run(world, videos=str(only_bad), output=str(tmp_path / "out"))
    assert not result.completed
    assert flow_run.state.type.value == "FAILED"
    assert "no usable videos" in flow_run.state.message and "corrupted.mp4" in flow_run.state.message


# --------------------------------------------------- retry policy and resume, on the real task objects
def _no_cache(task):
    return task.with_options(cache_policy=NO_CACHE, persist_result=False, retry_delay_seconds=0)


def test_transient_errors_are_retried_permanent_ones_are_not(world, monkeypatch):
    calls: list[str] = []

    def flaky(record, extractor, store):
        calls.append(record.video_id)
        if record.video_id == "hiccup" and calls.count("hiccup") == 1:
            raise TimeoutError("storage did not answer")
        if record.video_id == "broken":
            raise DecodeError(record.path, "moov atom not found")
        return ExtractOutcome(record.video_id, record.path, "extracted")

    monkeypatch.setattr(wrappers, "extract_video", flaky)
    task = _no_cache(wrappers.extract_video_task)
    base = {"path": "/x.mp4", "rel_path": "x.mp4", "size": 1, "mtime_ns": 1, "sha256": "0" * 64}
    base |= dict.fromkeys(("duration", "fps", "n_frames", "width", "height", "error"))
    profile = json.loads(feature_profile("lite").model_dump_json())
    store = world["params"]["store"]
    ok = task(base | {"video_id": "hiccup"}, profile, store, return_state=True)
    bad = task(base | {"video_id": "broken"}, profile, store, return_state=True)
    assert ok.is_completed() and calls.count("hiccup") == 2
    assert bad.is_failed() and calls.count("broken") == 1


def test_training_retried_after_a_crash_resumes_from_its_checkpoint(world, monkeypatch, tmp_path):
    real_epoch = train_module.run_epoch
    epochs: list[int] = []

    def crash_once(*args, **kwargs):
        epochs.append(len(epochs))
        if len(epochs) == 2:  # the second epoch of the first try dies
            raise OSError("lost the scratch disk")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", crash_once)
    cfg = PipelineParams(demo=True, overrides=TRAIN).experiment()
    run_dir = tmp_path / "run"
    p = world["params"]
    request = TrainRequest(config=cfg, store=p["store"], annotations=p["annotations"], run_dir=str(run_dir))
    state = _no_cache(wrappers.train_task)(request, "digest", return_state=True)
    assert state.is_completed()
    # epoch 1 ran, epoch 2 crashed, the retry resumed at epoch 2 instead of starting over: 4 calls, not 5
    assert len(epochs) == 4
    history = [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3]


def test_mssl_bundle_is_imported_trained_and_published(world, tmp_path):
    from test_mssl import COLL, FEAT, write_bundle  # the tiny bundle of the importer's own tests

    write_bundle(tmp_path / "bundle")
    params = PipelineParams(
        videos=None,
        mssl=MsslSource(root=str(tmp_path / "bundle"), collection=COLL, feature=FEAT),
        store=str(tmp_path / "features.zarr"),
        output=str(tmp_path / "out"),
        overrides={"visual_dim": 5, "query_dim": 4, "n_epoch": 1},
    )
    result = full_pipeline(params)
    assert result["status"] == "published" and result["promoted"]
    assert result["metrics"]["split"] == "val"  # the bundle has no val captions: its test file selects
    assert {s["id"] for s in result["skipped"]} >= {"v3", "v4"}  # videos without complete features
    assert read_current(tmp_path / "out" / "models") == result["version"]
