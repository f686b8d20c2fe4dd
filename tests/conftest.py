"""Shared fixtures: where the real test data lives, and GPU skipping."""

from __future__ import annotations

import os
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
