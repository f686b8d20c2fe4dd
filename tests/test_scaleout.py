"""Scale-out on real engines: the pipeline on a Dask cluster of two worker processes, and the feature store on
S3 (a moto server on loopback, region eu-west-1), with the same caching as on local disk.

A Prefect server of our own (temporary PREFECT_HOME, free port) serves the module. Dask workers and S3 clients
read their settings from the environment (PREFECT_*, AWS_*), exactly as on separate machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from distributed import Client, LocalCluster, get_task_stream
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.params import PipelineParams
from flows.pipeline import dask_task_runner, full_pipeline
from flows.server import free_port, start_server, stop_pid
from storage.catalog import scan_videos
from storage.demo_corpus import generate_demo_corpus
from storage.feature_store import FeatureStore
from tasks.extract import extract_videos
from tasks.profiles import feature_profile, visual_fingerprint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REGION = "eu-west-1"  # us-east-1 refuses an explicit location constraint
TRAIN = {"n_epoch": 1}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A Prefect server; PREFECT_HOME and its URL exported, so Dask workers reach it and share its cache."""
    home = tmp_path_factory.mktemp("prefect-home")
    pid, url = start_server(home, free_port(None))
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ.update(PREFECT_HOME=str(home), PREFECT_API_URL=url)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        stop_pid(pid)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_demo_corpus(tmp_path_factory.mktemp("corpus"), n_videos=5)


def params(corpus, store: str, output) -> PipelineParams:
    return PipelineParams(
        videos=corpus.videos_dir,
        annotations=corpus.annotations_path,
        store=store,
        output=str(output),
        overrides=TRAIN,
        build_index=False,
    )


def test_dask_cluster_of_two_processes_extracts_into_one_store(api, corpus, tmp_path):
    store = str(tmp_path / "features.zarr")
    with (
        LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        flow = full_pipeline.with_options(task_runner=dask_task_runner(cluster.scheduler_address))
        result = flow(params(corpus, store, tmp_path / "out"))
    assert sorted(result["extracted"]) == [v.video_id for v in corpus.videos]
    extract_workers = {t["worker"] for t in stream.data if "extract" in str(t["key"])}
    assert len(extract_workers) == 2, stream.data  # both processes did extraction work
    fp = visual_fingerprint(feature_profile("lite").visual)
    found = FeatureStore(store).resolve_video_ids(fp, [v.video_id for v in corpus.videos])
    assert len(found) == len(corpus.videos)  # every entry complete and visible to a fresh reader


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback and a bucket; AWS_* exported like credentials on a real machine."""
    port = free_port(None)
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.5)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("mamfusion", region_name=REGION)
    try:
        yield "s3://mamfusion"
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        stop_pid(proc.pid)
        log.close()


def test_store_on_s3_with_the_same_caching(api, corpus, s3, tmp_path):
    store = f"{s3}/features.zarr"
    first = full_pipeline(params(corpus, store, tmp_path / "out"))
    assert sorted(first["extracted"]) == [v.video_id for v in corpus.videos]
    assert (
        json.loads((tmp_path / "out" / "models" / first["version"] / "features.json").read_text())["store"]
        == store
    )
    second = full_pipeline(params(corpus, store, tmp_path / "out"))
    assert second["extracted"] == [] and sorted(second["cached"]) == sorted(first["extracted"])
    # Without Prefect's cache (a fresh Prefect database), the store's completeness check alone skips the work.
    summary = extract_videos(
        scan_videos(corpus.videos_dir).catalog.videos, feature_profile("lite"), FeatureStore(store)
    )
    assert len(summary.cached) == len(corpus.videos) and summary.stats.videos_decoded == 0
