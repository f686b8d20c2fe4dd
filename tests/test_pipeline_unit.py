"""Fast checks of the orchestration pieces that need no Prefect server: parameters, retry policy, caching
options, the deployments file, the pipeline's small helpers and the local-server bookkeeping."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from prefect.cache_policies import CacheKeyFnPolicy, CompoundCachePolicy, Inputs, TaskSource
from prefect.states import Failed
from pydantic import ValidationError

from flows import pipeline
from flows.commands import pipeline as pipeline_command
from flows.params import DEFAULT_ANNOTATIONS, DEFAULT_VIDEOS, MsslSource, PipelineParams
from flows.server import LocalPrefect, down, free_port, healthy
from storage.annotations import AnnotationError
from storage.registry import ModelRegistry, Skipped
from tasks import wrappers
from tasks.decode import DecodeError
from tasks.wrappers import ScanOutcome

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ parameters
def test_production_runs_name_their_data_and_the_demo_is_explicit():
    with pytest.raises(ValidationError, match="exactly one source.*demo: true"):
        PipelineParams()
    params = PipelineParams(demo=True)
    assert (params.videos, params.annotations) == (DEFAULT_VIDEOS, DEFAULT_ANNOTATIONS)
    assert params.experiment().name == "demo"
    resolved = params.resolved()
    assert Path(resolved.videos).is_absolute() and Path(resolved.store).is_absolute()
    own = PipelineParams(videos="/data/v", annotations="/data/a.csv")
    assert not own.demo and own.videos == "/data/v"
    with pytest.raises(ValidationError, match="leave `mssl` empty"):
        PipelineParams(demo=True, mssl=MsslSource(root="/b", collection="tvr", feature="i3d"))


def test_parameters_are_validated_before_anything_runs():
    with pytest.raises(ValidationError, match="exactly one source"):
        PipelineParams(videos=None)
    with pytest.raises(ValidationError, match="exactly one source"):
        PipelineParams(
            videos="/v", annotations="/a", mssl=MsslSource(root="/b", collection="tvr", feature="i3d")
        )
    with pytest.raises(ValidationError, match="annotations` is required"):
        PipelineParams(videos="/v")
    with pytest.raises(ValidationError, match="unknown preset"):
        PipelineParams(demo=True, preset="nope")
    with pytest.raises(ValidationError, match="n_epoch"):
        PipelineParams(demo=True, overrides={"n_epoch": 0})
    with pytest.raises(ValidationError, match="lr"):
        PipelineParams(demo=True, overrides={"lr": float("inf")})
    with pytest.raises(ValidationError, match="extra"):
        PipelineParams(demo=True, video="typo")


def test_device_applies_to_training_unless_overridden():
    assert PipelineParams(demo=True, device="cpu").experiment().train.device == "cpu"
    params = PipelineParams(demo=True, device="cpu", overrides={"device": "auto"})
    assert params.experiment().train.device == "auto"


def test_s3_store_url_is_kept_as_given():
    assert PipelineParams(demo=True, store="s3://bucket/f.zarr").resolved().store == "s3://bucket/f.zarr"


# ----------------------------------------------------------------------------------- retry and caching
class KilledWorker(Exception):  # named like distributed's, which is matched by name
    pass


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError("EIO"), True),
        (TimeoutError("slow"), True),
        (ConnectionResetError("peer"), True),
        (KilledWorker("w1"), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("no"), False),
        (DecodeError("/v.mp4", "moov atom not found"), False),
        (AnnotationError("/a.csv", 3, "no caption"), False),
        (ValueError("bad config"), False),
    ],
)
def test_only_transient_failures_are_retried(exc, transient):
    assert wrappers.is_transient(exc) is transient
    assert wrappers.retry_transient(None, None, Failed(data=exc)) is transient


def test_every_task_retries_only_transient_failures():
    for task in (
        wrappers.scan_catalog_task,
        wrappers.extract_video_task,
        wrappers.extract_text_task,
        wrappers.train_task,
        wrappers.evaluate_model_task,
        wrappers.publish_task,
        wrappers.build_index_task,
    ):
        assert task.retries == wrappers.RETRIES and task.retry_condition_fn is wrappers.retry_transient, (
            task.name
        )
        assert task.retry_delay_seconds == [2, 4]  # exponential backoff


def test_cached_tasks_key_on_inputs_source_and_the_code_they_run():
    policy = wrappers.extract_video_task.cache_policy
    assert isinstance(policy, CompoundCachePolicy)
    kinds = {type(p) for p in policy.policies}
    assert {Inputs, TaskSource, CacheKeyFnPolicy} <= kinds
    code = next(p for p in policy.policies if isinstance(p, CacheKeyFnPolicy))
    assert code.compute_key(None, {}, {}) == wrappers.code_digest("tasks.extract")
    train_key = next(p for p in wrappers.train_task.cache_policy.policies if isinstance(p, CacheKeyFnPolicy))
    assert train_key.compute_key(None, {}, {}) == wrappers.code_digest("tasks.train")
    for task in (wrappers.extract_video_task, wrappers.extract_text_task, wrappers.train_task):
        assert task.persist_result
    stored = wrappers.stored_under(wrappers.train_task, Path("/out/prefect-results"))
    assert stored.result_storage == Path("/out/prefect-results")
    assert stored.cache_policy is wrappers.train_task.cache_policy


def test_code_digest_follows_every_module_a_task_imports(tmp_path, monkeypatch):
    """Editing a helper two imports away changes the key (TASK_SOURCE alone would replay stale results)."""
    pkg = tmp_path / "tasks"  # a stand-in project package, first on sys.path
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from tasks import middle\n")
    (pkg / "middle.py").write_text("from .leaf import VALUE\n")
    (pkg / "leaf.py").write_text("VALUE = 1\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in __import__("sys").modules if m == "tasks" or m.startswith("tasks.")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    wrappers.code_digest.cache_clear()
    try:
        first = wrappers.code_digest("tasks.top")
        (pkg / "unrelated.py").write_text("X = 2\n")
        wrappers.code_digest.cache_clear()
        assert wrappers.code_digest("tasks.top") == first
        (pkg / "leaf.py").write_text("VALUE = 2\n")
        wrappers.code_digest.cache_clear()
        assert wrappers.code_digest("tasks.top") != first
    finally:
        wrappers.code_digest.cache_clear()


# ----------------------------------------------------------------------------------------- deployments
def test_deployments_file_names_both_flows_and_schedules_retraining():
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    assert spec["name"] == "mamfusion"
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"full-pipeline", "demo", "retrain-on-new-videos"}
    assert deployments["demo"]["parameters"] == {"params": {"demo": True}}
    assert deployments["full-pipeline"]["parameters"] == {}  # a production run must name its data
    for d in deployments.values():
        module, func = d["entrypoint"].split(":")
        assert (REPO / module).is_file()
        assert getattr(pipeline, func).name == "mamfusion"  # deployment names are mamfusion/<name>
        assert d["work_pool"]["name"] == "local-pool"
    assert deployments["retrain-on-new-videos"]["schedules"][0]["cron"]
    step = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $MAMFUSION_REPO }}"


# ---------------------------------------------------------------------------------------- flow helpers
def test_nothing_new_needs_same_videos_same_captions_and_a_current_model(tmp_path):
    layout = pipeline.Layout(tmp_path)
    registry = ModelRegistry(layout.models)
    digests = {"annotations": "abc", "val_annotations": None}
    quiet = ScanOutcome(catalog="c.json", new=[], changed=[], removed=[], readable=[], skipped=[])
    assert not pipeline._nothing_new(layout, registry, quiet, digests)  # never trained
    (layout.models / "v1").mkdir(parents=True)
    registry.set_current("v1")
    layout.trained.write_text(json.dumps(digests))
    assert pipeline._nothing_new(layout, registry, quiet, digests)
    for change in ({"new": ["v9"]}, {"removed": ["v1"]}):
        assert not pipeline._nothing_new(layout, registry, quiet.model_copy(update=change), digests)
    assert not pipeline._nothing_new(layout, registry, quiet, digests | {"annotations": "edited"})


def test_no_usable_videos_message_names_the_folder_and_reasons():
    assert pipeline._no_usable_message("/v", []) == "no usable videos: no video files found under /v"
    message = pipeline._no_usable_message(
        "/v", [Skipped(kind="video", id="/v/corrupted.mp4", reason="moov atom not found")]
    )
    assert message == "no usable videos under /v: all 1 were skipped (corrupted.mp4: moov atom not found)"


def test_report_plots_are_inlined_for_the_ui(tmp_path):
    (tmp_path / "plots").mkdir()
    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "plots" / "loss.png").write_bytes(png)
    text = pipeline._inline_plots("![Loss](plots/loss.png)\n![Gone](plots/gone.png)", tmp_path)
    assert f"![Loss](data:image/png;base64,{base64.b64encode(png).decode()})" in text
    assert "![Gone](plots/gone.png)" in text


# ---------------------------------------------------------------------------------------- local server
def test_local_server_bookkeeping(tmp_path):
    port = free_port(None)
    assert not healthy(f"http://127.0.0.1:{port}/api", timeout=0.5)
    assert down(tmp_path) == []  # nothing started here
    LocalPrefect(str(tmp_path), f"http://127.0.0.1:{port}/api", {"worker": 2**22 + 7}).save()
    loaded = LocalPrefect.load(tmp_path)
    assert loaded.started == {"worker": 2**22 + 7}
    assert loaded.env()["PREFECT_API_URL"].endswith(f"{port}/api")
    assert down(tmp_path) == ["worker"]  # that pid does not exist: nothing to signal, state cleared
    assert LocalPrefect.load(tmp_path) is None


def test_pipeline_command_rejects_bad_overrides(capsys):
    parser = __import__("argparse").ArgumentParser()
    pipeline_command.add_arguments(parser)
    assert pipeline_command.run(parser.parse_args(["--demo", "--set", "n_epoch=0"])) == 2
    assert "n_epoch" in capsys.readouterr().err
