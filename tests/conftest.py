"""Shared fixtures: where the real test data lives, and GPU skipping."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Flows that run inside the test process talk to servers the tests start and stop. Prefect's background log
# shipper would keep retrying those dead servers at interpreter exit and hold pytest open after the summary;
# run logs are not under test, so they stay local (artifacts and states still go to the API).
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAMFUSION_SHARED", REPO.parent / "shared"))
REALDATA = SHARED / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real videos and annotation files beside the repo (never copied into it)."""
    if not REALDATA.is_dir():
        pytest.skip(f"real test data not found at {REALDATA} (set MAMFUSION_SHARED)")
    return REALDATA


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str]]]:
    """A real S3 API on loopback (moto's threaded server) with a new empty bucket: ("s3://<bucket>", options).

    Bucket names are unique: moto keeps its state per process, across servers.
    """
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        S3FileSystem(**options).mkdir(bucket)
        yield f"s3://{bucket}", options
    finally:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit with pytest's status even if a library left a non-daemon thread behind (CI must never hang)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
