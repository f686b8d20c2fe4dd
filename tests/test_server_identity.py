"""`server down` signals only processes `server up` started: a stale, reused or forged pid is left alone with
a message, and a process started through the same code path is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import cli
from flows import server as srv
from flows.server import STATE_FILE, LocalPrefect, LocalServerError, ProcessIdentity, down, start_process

SLEEP = ["sleep", "60"]


@pytest.fixture
def unrelated() -> Iterator[subprocess.Popen[bytes]]:
    """A process `up` did not start, leading its own process group (so a wrong killpg would hit it)."""
    proc = subprocess.Popen(SLEEP, start_new_session=True)
    try:
        yield proc
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    time.sleep(0.3)  # a SIGTERM, had one been sent, has landed by now
    return proc.poll() is None


def _forge(home: Path, pid: int, identity: dict[str, object] | None = None) -> None:
    state: dict[str, object] = {
        "home": str(home),
        "api_url": "http://127.0.0.1:9/api",
        "started": {"worker": pid},
    }
    if identity is not None:
        state["identity"] = {"worker": identity}
    (home / STATE_FILE).write_text(json.dumps(state))


def test_a_state_file_without_identities_never_signals(
    tmp_path: Path, unrelated: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    _forge(tmp_path, unrelated.pid)  # the format written before identities were recorded
    assert down(tmp_path) == []
    assert _alive(unrelated)
    err = capsys.readouterr().err
    assert "not stopping the worker" in err and f"pid {unrelated.pid}" in err
    assert f"kill -TERM -- -{unrelated.pid}" in err and "sleep 60" in err
    assert not (tmp_path / STATE_FILE).exists()  # the entry is dropped: a second `down` does nothing


@pytest.mark.parametrize("forgery", ["other start", "other command"])
def test_a_pid_that_is_now_another_process_is_refused(
    tmp_path: Path, unrelated: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str], forgery: str
) -> None:
    real = srv.process_identity(unrelated.pid)
    assert real is not None and list(real.cmdline) == SLEEP
    if forgery == "other start":  # same command line, but a process that started at another moment
        identity = {"started": real.started + "1", "cmdline": SLEEP}
    else:
        identity = {"started": real.started, "cmdline": [sys.executable, "-m", "prefect", "worker", "start"]}
    _forge(tmp_path, unrelated.pid, identity)
    assert down(tmp_path) == []
    assert _alive(unrelated)
    err = capsys.readouterr().err
    assert "pid was reused" in err and "`sleep 60`" in err
    assert not (tmp_path / STATE_FILE).exists()


def test_the_cli_refuses_too_and_exits_nonzero(
    tmp_path: Path, unrelated: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    _forge(tmp_path, unrelated.pid, {"started": "0:0", "cmdline": SLEEP})
    assert cli.main(["server", "down", "--home", str(tmp_path), "--json"]) == 1
    assert _alive(unrelated)
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["stopped"] == [] and len(report["refused"]) == 1
    assert f"pid {unrelated.pid}" in report["refused"][0] and "server down: not stopping the worker" in err


def test_dangerous_or_damaged_pids_are_rejected_before_any_signal(tmp_path: Path) -> None:
    for pid in (0, 1, -1, "123", True):  # killpg(0) would signal our own group
        _forge(tmp_path, pid)  # type: ignore[arg-type]
        with pytest.raises(LocalServerError, match="is damaged"):
            down(tmp_path)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(LocalServerError, match="nothing was signalled"):
        down(tmp_path)


def test_a_process_started_through_start_process_is_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, identity = start_process(SLEEP, dict(os.environ), tmp_path / "worker.log")
    try:
        assert identity == srv.process_identity(proc.pid) and list(identity.cmdline) == SLEEP
        local = LocalPrefect(str(tmp_path), "http://127.0.0.1:9/api")
        local.record("worker", proc.pid, identity)
        local.save()
        assert LocalPrefect.load(tmp_path) == local  # the identity survives the JSON round trip
        assert down(tmp_path) == ["worker"]
        assert srv.process_identity(proc.pid) is None  # terminated (and reaped by stop_pid)
        assert capsys.readouterr().err == ""
    finally:
        _kill(proc)


def test_up_records_identities_and_down_stops_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` itself (server + worker), with `sleep` standing in for the Prefect processes it spawns."""
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn(
        args: list[str], env: dict[str, str], log: Path
    ) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
        proc, identity = start_process(SLEEP, env, log)
        spawned.append(proc)
        return proc, identity

    monkeypatch.setattr(srv, "_spawn", spawn)
    monkeypatch.setattr(srv, "healthy", lambda url, timeout=2.0: True)
    monkeypatch.setattr(srv, "register", lambda local: None)
    try:
        local = srv.up(tmp_path, port=srv.free_port(None))
        assert set(local.started) == {"server", "worker"} == set(local.identity)
        saved = json.loads((tmp_path / STATE_FILE).read_text())
        assert saved["identity"]["worker"]["cmdline"] == SLEEP
        assert cli.main(["server", "down", "--home", str(tmp_path)]) == 0
        assert len(spawned) == 2 and all(srv.process_identity(p.pid) is None for p in spawned)
    finally:
        for proc in spawned:
            _kill(proc)


def test_a_leader_that_exited_leaves_its_group_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The leader is gone, so nothing proves the group's remaining processes are ours: tell, do not signal."""
    spawn_child = "import subprocess; print(subprocess.Popen(['sleep', '60']).pid, flush=True)"
    log = tmp_path / "worker.log"
    proc, identity = start_process([sys.executable, "-c", spawn_child], dict(os.environ), log)
    child = 0
    try:
        proc.wait(timeout=30)  # reaped: its pid is free, its group lives on in the orphaned sleep
        child = int(log.read_text().split()[0])
        local = LocalPrefect(str(tmp_path), "http://127.0.0.1:9/api")
        local.record("worker", proc.pid, identity)
        local.save()
        assert down(tmp_path) == []
        time.sleep(0.3)
        assert srv.process_identity(child) is not None
        assert f"kill -TERM -- -{proc.pid}" in capsys.readouterr().err
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
