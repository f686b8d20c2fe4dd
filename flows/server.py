"""A local Prefect server, work pool, deployments and worker (for the demo, tests and `mamfusion server`).

`up()` reuses a healthy server (PREFECT_API_URL, else 127.0.0.1:4200) or starts one on SQLite under a Prefect
home of our own, creates the `local-pool` process pool, registers `deployments/prefect.yaml` and starts a
worker. The processes it started are written to `<home>/mamfusion-local.json`, so `down()` stops exactly those
(each was started in its own session: stopping its process group also stops the flow runs the worker spawned).

A pid alone does not say which process it is: after a crash the state file goes stale and the pid may be
reused, and the file can be edited. So each entry also records the process's identity (its start time, which
never changes while it lives, and its command line), and `down()` signals a pid only if both still match.
Anything else, including entries written before identities were recorded, is refused with a message saying
how to stop it by hand, and dropped from the file.
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

import psutil

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


# Command lines of processes whose own command line cannot be compared (see `ProcessIdentity.matches`).
_ZOMBIE = ("<exited, not yet reaped>",)
_UNREADABLE = ("<command line not readable>",)


@dataclass(frozen=True)
class ProcessIdentity:
    """Which process a pid named when we started it (pids are reused, so the pid alone proves nothing)."""

    started: str  # "<boot id>:<clock ticks after boot>" from /proc/<pid>/stat; elsewhere psutil's create time
    cmdline: tuple[str, ...]

    def matches(self, recorded: ProcessIdentity) -> bool:
        """Same process: same start and command line (an exited, unreaped one keeps only its start time)."""
        return self.started == recorded.started and self.cmdline in (recorded.cmdline, _ZOMBIE)

    @classmethod
    def from_json(cls, raw: Any) -> ProcessIdentity:
        if not (isinstance(raw, dict) and isinstance(raw.get("started"), str)):
            raise ValueError(f"bad process identity {raw!r}")
        cmdline = raw.get("cmdline")
        if not (isinstance(cmdline, list) and all(isinstance(a, str) for a in cmdline)):
            raise ValueError(f"bad command line {cmdline!r}")
        return cls(raw["started"], tuple(cmdline))


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of process `pid` now, or None when there is no such process."""
    try:
        started = _start_mark(pid)
        try:
            cmdline = tuple(psutil.Process(pid).cmdline())
        except psutil.ZombieProcess:
            cmdline = _ZOMBIE
        except psutil.AccessDenied:  # another user's process (never one we started)
            cmdline = _UNREADABLE
    except (psutil.NoSuchProcess, ProcessLookupError):
        return None
    return ProcessIdentity(started, cmdline)


def _start_mark(pid: int) -> str:
    """When `pid` started, as a value fixed for its life (psutil's create_time follows clock changes)."""
    if not Path("/proc/self/stat").is_file():  # not Linux: seconds since the epoch, good to 10 ms
        return f"epoch:{psutil.Process(pid).create_time():.2f}"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise ProcessLookupError(pid) from err
    ticks = stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime; the name before ")" may hold spaces
    return f"{_boot_id()}:{ticks}"


def _boot_id() -> str:
    """Distinguishes boots: start ticks restart from zero at each boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "boot"


@dataclass
class LocalPrefect:
    """A server we use (started by us or found running) and the processes we started for it."""

    home: str
    api_url: str
    started: dict[str, int] = field(default_factory=dict)  # role -> pid (process-group leader)
    identity: dict[str, ProcessIdentity] = field(default_factory=dict)  # role -> who that pid was at start

    def env(self) -> dict[str, str]:
        """Environment for CLI calls, workers and flow runs against this server."""
        return prefect_env(self.home, self.api_url)

    def record(self, role: str, pid: int, identity: ProcessIdentity) -> None:
        self.started[role] = pid
        self.identity[role] = identity

    def save(self) -> None:
        (Path(self.home) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, home: str | Path) -> LocalPrefect | None:
        path = Path(home) / STATE_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            started = {str(role): _valid_pid(pid) for role, pid in raw.get("started", {}).items()}
            identity = {str(r): ProcessIdentity.from_json(v) for r, v in raw.get("identity", {}).items()}
            return cls(str(raw["home"]), str(raw["api_url"]), started, identity)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LocalServerError(
                f"state file {path} is damaged ({type(err).__name__}: {err}); nothing was signalled. Stop "
                "the processes it meant by hand (ps -ef | grep prefect), then delete the file"
            ) from err


def _valid_pid(pid: Any) -> int:
    if type(pid) is not int or pid <= 1:  # 0, 1 and negatives mean "my group", init or "every process"
        raise ValueError(f"bad pid {pid!r}")
    return pid


def prefect_env(home: str | Path, api_url: str) -> dict[str, str]:
    return os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # flow runs of our worker always ship their logs: the per-epoch lines must reach the UI
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
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


def start_process(
    argv: list[str], env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
    """Start `argv` in a session of its own (stopping its group stops its children) and record who it is."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    # Popen returns once the exec is under way, and our unreaped child keeps its pid: this is the process we
    # started. The kernel fills in the new command line a moment later (an empty one reads as []), so wait.
    deadline = time.monotonic() + 5.0
    identity = process_identity(proc.pid)
    while identity is not None and not identity.cmdline and time.monotonic() < deadline:
        time.sleep(0.01)
        identity = process_identity(proc.pid)
    if identity is None:
        raise LocalServerError(f"{argv[0]} (pid {proc.pid}) vanished right after it started; see {log}")
    return proc, identity


def _spawn(
    args: list[str], env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
    return start_process([sys.executable, "-m", "prefect", *args], env, log)


def start_server(home: str | Path, port: int | None = None) -> tuple[int, str]:
    """Start `prefect server start` on SQLite under `home`; returns (pid, api_url) once it is healthy."""
    pid, _, api_url = _start_server(home, port)
    return pid, api_url


def _start_server(home: str | Path, port: int | None = None) -> tuple[int, ProcessIdentity, str]:
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://{HOST}:{port}/api"
    log = home / "server.log"
    proc, identity = _spawn(
        ["server", "start", "--host", HOST, "--port", str(port)], prefect_env(home, api_url), log
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_pid(proc.pid)
            raise LocalServerError(
                f"Prefect server did not start on {api_url}; see {log}:\n{log.read_text()[-2000:]}"
            )
        time.sleep(1.0)
    return proc.pid, identity, api_url


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
    """Start a worker on the pool and record it in `local` (its pid and identity)."""
    proc, identity = _spawn(["worker", "start", "--pool", POOL], local.env(), Path(local.home) / "worker.log")
    local.record("worker", proc.pid, identity)
    return proc.pid


def up(home: str | Path, port: int | None = None, *, reuse: bool = True) -> LocalPrefect:
    """Server (reused or started), pool, deployments and a worker; the state is saved for `down`."""
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    found = find_server() if reuse and port is None else None
    if found:
        local = LocalPrefect(str(home), found)
    else:
        pid, identity, api_url = _start_server(home, port)
        local = LocalPrefect(str(home), api_url)
        local.record("server", pid, identity)
    local.save()
    register(local)
    start_worker(local)
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


@dataclass
class StopReport:
    """What `stop_started` did: roles no longer running, and one message per process it would not signal."""

    stopped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def stop_started(home: str | Path) -> StopReport:
    """Stop what `up` started under `home` (worker first), each only if its pid is still that process."""
    local = LocalPrefect.load(home)
    report = StopReport()
    if local is None:
        return report
    path = Path(home) / STATE_FILE
    roles = [r for r in ("worker", "server") if r in local.started] + sorted(
        set(local.started) - {"worker", "server"}
    )
    for role in roles:
        pid = local.started[role]
        refusal = _refusal(role, pid, local.identity.get(role), path)
        if refusal is None:
            stop_pid(pid)
            report.stopped.append(role)
        elif refusal:
            report.refused.append(refusal)
        else:  # already gone: nothing to signal
            report.stopped.append(role)
    path.unlink()  # every entry was stopped, already gone, or refused (and is now the user's to stop)
    return report


def _refusal(role: str, pid: int, recorded: ProcessIdentity | None, path: Path) -> str | None:
    """None: `pid` is the process `up` started (signal it); "": it is gone; else why not to signal it."""
    now = process_identity(pid)
    by_hand = f"if it is the Prefect {role} you started, stop it by hand with: kill -TERM -- -{pid}"
    if now is None:
        if not _group_alive(pid):
            return ""
        return (
            f"not stopping the {role} (pid {pid}): it has exited, but processes of its process group {pid} "
            f"remain and cannot be verified; if they are yours, stop them with: kill -TERM -- -{pid}"
        )
    command = " ".join(now.cmdline)
    if recorded is None:
        return (
            f"not stopping the {role} (pid {pid}): {path} does not record which process that pid was (it was "
            f"written by an older version or edited), and pid {pid} is now `{command}`, which may be an "
            f"unrelated program; {by_hand}"
        )
    if not now.matches(recorded):
        return (
            f"not stopping the {role} (pid {pid}): that pid is now `{command}`, started {_started_at(pid)}, "
            f"not the process `server up` started (`{' '.join(recorded.cmdline)}`): the {role} has exited "
            f"and its pid was reused, or {path} was edited; {by_hand}"
        )
    return None


def _started_at(pid: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(psutil.Process(pid).create_time()))
    except psutil.Error:
        return "at an unknown time"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but not ours to signal
        return True
    return True


def down(home: str | Path) -> list[str]:
    """Stop what `up` started under `home`; returns the roles no longer running, prints what it refused."""
    report = stop_started(home)
    for message in report.refused:
        print(f"server down: {message}", file=sys.stderr)
    return report.stopped


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
