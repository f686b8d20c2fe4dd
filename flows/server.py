"""A local Prefect server, work pool, deployments and worker (for the demo, tests and `mamfusion server`).

`up()` reuses a healthy server (PREFECT_API_URL, else 127.0.0.1:4200) or starts one on SQLite under a Prefect
home of our own, creates the `local-pool` process pool, registers `deployments/prefect.yaml` and starts a
worker. The processes it started are written to `<home>/mamfusion-local.json`, so `down()` stops exactly those
(each was started in its own session: stopping its process group also stops the flow runs the worker spawned).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage.errors import MamFusionError

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = "deployments/prefect.yaml"
POOL = "local-pool"
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
STATE_FILE = "mamfusion-local.json"
SERVER_START_TIMEOUT_S = 240.0


class LocalServerError(MamFusionError, RuntimeError):
    """A Prefect CLI step or the server start failed; the message says which and shows its output."""


@dataclass
class LocalPrefect:
    """A server we use (started by us or found running) and the processes we started for it."""

    home: str
    api_url: str
    started: dict[str, int] = field(default_factory=dict)  # role -> pid (process-group leader)

    def env(self) -> dict[str, str]:
        """Environment for CLI calls, workers and flow runs against this server."""
        return prefect_env(self.home, self.api_url)

    def save(self) -> None:
        (Path(self.home) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, home: str | Path) -> LocalPrefect | None:
        path = Path(home) / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def prefect_env(home: str | Path, api_url: str) -> dict[str, str]:
    return os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MAMFUSION_REPO": str(REPO),
    }


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


def free_port(preferred: int | None = DEFAULT_PORT) -> int:
    """`preferred` if nothing listens there, else a port the OS hands out."""
    with socket.socket() as s:
        try:
            s.bind((HOST, preferred or 0))
        except OSError:
            s.bind((HOST, 0))
        return s.getsockname()[1]


def _cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def prefect_cli(args: list[str], env: dict[str, str], timeout: float = 300.0) -> str:
    """Run `python -m prefect ARGS` from the repository root; LocalServerError with its output on failure."""
    proc = _cli(args, env, timeout)
    if proc.returncode != 0:
        raise LocalServerError(
            f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_server(home: str | Path, port: int | None = None) -> tuple[int, str]:
    """Start `prefect server start` on SQLite under `home`; returns (pid, api_url) once it is healthy."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://{HOST}:{port}/api"
    log = home / "server.log"
    proc = _spawn(["server", "start", "--host", HOST, "--port", str(port)], prefect_env(home, api_url), log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_pid(proc.pid)
            raise LocalServerError(
                f"Prefect server did not start on {api_url}; see {log}:\n{log.read_text()[-2000:]}"
            )
        time.sleep(1.0)
    return proc.pid, api_url


def find_server() -> str | None:
    """A healthy API to reuse: PREFECT_API_URL if set, else the default local port."""
    for url in (os.environ.get("PREFECT_API_URL"), f"http://{HOST}:{DEFAULT_PORT}/api"):
        if url and healthy(url):
            return url
    return None


def register(local: LocalPrefect) -> None:
    """The process work pool (kept if it exists) and every deployment of deployments/prefect.yaml."""
    env = local.env()
    pools = prefect_cli(["work-pool", "ls"], env)
    if POOL not in pools:
        prefect_cli(["work-pool", "create", POOL, "--type", "process"], env)
    prefect_cli(["--no-prompt", "deploy", "--all", "--prefect-file", PREFECT_FILE], env)


def start_worker(local: LocalPrefect) -> int:
    proc = _spawn(["worker", "start", "--pool", POOL], local.env(), Path(local.home) / "worker.log")
    return proc.pid


def up(home: str | Path, port: int | None = None, *, reuse: bool = True) -> LocalPrefect:
    """Server (reused or started), pool, deployments and a worker; the state is saved for `down`."""
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    found = find_server() if reuse and port is None else None
    if found:
        local = LocalPrefect(str(home), found)
    else:
        pid, api_url = start_server(home, port)
        local = LocalPrefect(str(home), api_url, {"server": pid})
    local.save()
    register(local)
    local.started["worker"] = start_worker(local)
    local.save()
    return local


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads (a worker's flow runs too), SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        _reap(pid)
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect our own child so it does not linger as a zombie (not our child: nothing to do)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(home: str | Path) -> list[str]:
    """Stop what `up` started under `home` (worker first); returns the roles stopped."""
    local = LocalPrefect.load(home)
    if local is None:
        return []
    for role in ("worker", "server"):
        if role in local.started:
            stop_pid(local.started[role])
    (Path(home) / STATE_FILE).unlink()
    return [r for r in ("worker", "server") if r in local.started]


_UUID = re.compile(r"UUID: ([0-9a-f-]{36})")


@dataclass(frozen=True)
class DeploymentRun:
    flow_run_id: str
    completed: bool
    output: str


def run_deployment(
    local: LocalPrefect, name: str, params: dict[str, Any] | None = None, timeout: float = 900.0
) -> DeploymentRun:
    """`prefect deployment run NAME --params '{"params": ...}' --watch`, as a user would type it."""
    args = ["deployment", "run", name, "--watch", "--watch-timeout", str(int(timeout))]
    if params is not None:
        args += ["--params", json.dumps({"params": params})]
    proc = _cli(args, local.env(), timeout + 60)
    output = proc.stdout + proc.stderr
    match = _UUID.search(output)
    if match is None:
        raise LocalServerError(f"prefect deployment run {name} created no flow run:\n{output}")
    return DeploymentRun(match.group(1), proc.returncode == 0, output)
