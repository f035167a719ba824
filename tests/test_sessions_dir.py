"""collect_dead_sessions: which session dirs a starting agent may remove."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from topyaz_mount.agent.session import collect_dead_sessions


def _session(sessions: Path, name: str, pid_written: bool, age: float = 0) -> Path:
    d = sessions / name
    d.mkdir(parents=True)
    lock = d / "agent.lock"
    lock.write_text("4242\n" if pid_written else "")
    if age:
        then = time.time() - age
        os.utime(d, (then, then))
    return d


def test_a_new_session_whose_agent_has_not_locked_yet_survives(tmp_path: Path):
    starting = _session(tmp_path, "starting", pid_written=False)
    assert collect_dead_sessions(tmp_path) == []
    assert starting.is_dir()


def test_dead_sessions_go_and_live_ones_stay(tmp_path: Path):
    dead = _session(tmp_path, "dead", pid_written=True)
    died_starting = _session(tmp_path, "died-starting", pid_written=False, age=120)
    live = _session(tmp_path, "live", pid_written=True)
    fd = os.open(live / "agent.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert sorted(collect_dead_sessions(tmp_path)) == ["dead", "died-starting"]
    finally:
        os.close(fd)
    assert not dead.exists() and not died_starting.exists() and live.is_dir()
