"""End to end: one-shot execs that reuse a session (`--persist`, persist.py).

A first exec leaves its session up; the next exec on the same host and root runs
through it (one session in `status`, the same agent), with the same stdout, exit
status and output bytes as a one-shot exec; `--persist 0` leaves nothing; options
that change the job (here `--read-only`) get a session of their own; `unmount` ends
a persisted session, and so does its idle time. Each test has a private runtime dir
(sockets, keys, logs) and unmounts what is left at its end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from e2e_util import CLI, client_env, describe, exec_argv, pid_alive, wait_until
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)

pytestmark = [pytest.mark.e2e]

JOB = 'cat in.bin > out/copy.bin; echo "said $1"; echo oops >&2; exit "$2"'


class Execs:
    """One-shot execs and session commands sharing a private runtime dir."""

    def __init__(self, testhost, root: Path, runtime: Path) -> None:
        self.testhost = testhost
        self.root = root
        self.runtime = runtime
        self.env = {**client_env(), "TOPYAZ_MOUNT_RUNTIME_DIR": str(runtime)}
        self.env.pop("TOPYAZ_MOUNT_PERSIST")
        self.pids: set[int] = set()

    def exec(self, *command: str, options=()) -> subprocess.CompletedProcess:
        argv = exec_argv(self.testhost, self.root, command, options=options)
        r = subprocess.run(argv, env=self.env, cwd=self.root, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        self.pids |= {s["pid"] for s in self.sessions()}
        return r

    def job(self, word: str, code: int, options=()) -> subprocess.CompletedProcess:
        return self.exec("sh", "-c", JOB, "job", word, str(code), options=options)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env=self.env, cwd=self.root,
                              capture_output=True, timeout=60)

    def sessions(self) -> list[dict]:
        r = self.cli("status", "--json")
        assert r.returncode == 0, describe(r)
        return json.loads(r.stdout)

    def files(self) -> list[str]:
        """What sessions left in the runtime dir (attach's records included), as paths."""
        return sorted(
            str(p.relative_to(self.runtime))
            for p in self.runtime.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def close(self) -> None:
        for s in self.sessions():
            self.cli("unmount", "--force", s["name"])
        for pid in self.pids:
            if pid_alive(pid) and wait_until(lambda p=pid: not pid_alive(p), 10) is False:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def execs(testhost, client_root, tmp_path):
    (client_root / "in.bin").write_bytes(os.urandom(300_000))
    (client_root / "out").mkdir()
    e = Execs(testhost, client_root, tmp_path / "runtime")
    try:
        yield e
    finally:
        e.close()


def check_job(execs: Execs, r: subprocess.CompletedProcess, word: str, code: int) -> None:
    assert r.returncode == code, describe(r)
    assert r.stdout == f"said {word}\n".encode(), describe(r)
    assert r.stderr == b"oops\n", describe(r)
    copy = execs.root / "out" / "copy.bin"
    assert copy.read_bytes() == (execs.root / "in.bin").read_bytes()
    copy.unlink()


def test_second_exec_reuses_the_session_and_unmount_ends_it(execs):
    check_job(execs, execs.job("first", 3, options=["--persist", "1m"]), "first", 3)
    (first,) = execs.sessions()
    assert first["root"] == str(execs.root)
    check_job(execs, execs.job("second", 0), "second", 0)
    (second,) = execs.sessions()  # the same session, agent and connection served both
    assert (second["name"], second["pid"], second["agent_pid"]) == (
        first["name"], first["pid"], first["agent_pid"])
    r = execs.cli("unmount", first["name"])
    assert r.returncode == 0, describe(r)
    assert execs.sessions() == []
    assert wait_until(lambda: not pid_alive(first["pid"]), 10)
    assert execs.files() == []  # socket, key and log gone with it


def test_persist_0_leaves_nothing(execs):
    check_job(execs, execs.job("once", 5, options=["--persist", "0"]), "once", 5)
    assert execs.sessions() == []
    assert execs.files() == []


def test_incompatible_options_start_a_fresh_session(execs):
    check_job(execs, execs.job("a", 0, options=["--persist", "1m"]), "a", 0)
    r = execs.exec("sh", "-c", "echo x > out/no.txt", options=["--read-only"])
    assert r.returncode != 0 and not (execs.root / "out" / "no.txt").exists(), describe(r)
    assert len(execs.sessions()) == 2  # the read-only one could not use the first
    check_job(execs, execs.job("b", 0), "b", 0)
    assert len(execs.sessions()) == 2  # ... and the first is still there for this one


def test_a_persisted_session_ends_after_its_idle_time(execs):
    check_job(execs, execs.job("brief", 0, options=["--persist", "1s"]), "brief", 0)
    pids = execs.pids
    assert pids
    assert wait_until(lambda: execs.sessions() == [], 15)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10)
    assert execs.files() == []
