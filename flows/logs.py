"""Quiet, informative run output: routine Prefect and HTTP chatter off unless asked for (`-v`).

A pipeline run printed ~300 lines, 24 of them useful: every HTTP request to the local API (httpx INFO) and a
"Finished in state Completed()" line per task. Those are hidden by default; failures, retries, warnings and
our own progress lines are not. `MAMFUSION_VERBOSE=1` (set by `mamfusion -v`) shows everything. The local
server's telemetry is off by default (offline machines logged "Failed to send telemetry" tracebacks); set
`PREFECT_SERVER_ANALYTICS_ENABLED=true` to send it. The temporary server gets 180 s to start (Prefect's 20 s
default timed out under load).
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "MAMFUSION_VERBOSE"
_ROUTINE = ("Finished in state Completed", "Finished in state Cached", "Created task run", "Executing '")


class HideRoutine(logging.Filter):
    """Drops Prefect's per-task bookkeeping lines; keeps failures, retries and everything we log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_ROUTINE)


def quiet(verbose: bool | None = None) -> None:
    """Apply the defaults above in this process (idempotent). Call before Prefect starts a server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server of `mamfusion pipeline` needs more than Prefect's 20 s on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    if verbose:
        return
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, HideRoutine) for f in logger.filters):
            logger.addFilter(HideRoutine())
