"""agent/hostos.py on this (POSIX) host: the calls the stage path makes instead of the
POSIX-only ones behave as those did. The Windows branch is type-checked only."""

from __future__ import annotations

import os
import subprocess

import pytest
from e2e_util import wait_until

from topyaz_mount.agent import hostos


def test_pread_and_pwrite_leave_the_offset_alone(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | hostos.CLOEXEC, 0o600)
    try:
        assert hostos.pwrite(fd, b"hello world", 0) == 11
        assert hostos.pwrite(fd, memoryview(b"W"), 6) == 1
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert hostos.pread(fd, 5, 6) == b"World"
        assert hostos.pread(fd, 100, 11) == b""
    finally:
        os.close(fd)


def test_shared_locks_coexist_and_an_exclusive_one_excludes(tmp_path):
    path = tmp_path / "object"
    path.write_bytes(b"x")
    a, b, c = (os.open(path, os.O_RDONLY | hostos.CLOEXEC) for _ in range(3))
    try:
        hostos.lock(a, exclusive=False)
        hostos.lock(b, exclusive=False, wait=False)
        with pytest.raises(BlockingIOError):
            hostos.lock(c, exclusive=True, wait=False)
        os.close(a)
        os.close(b)
        a = b = -1
        hostos.lock(c, exclusive=True, wait=False)
    finally:
        for fd in (a, b, c):
            if fd >= 0:
                os.close(fd)


def test_a_group_is_signalled_whole_and_seen_gone():
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    try:
        assert hostos.group_alive(leader.pid)
        hostos.kill_group(leader.pid, hostos.SIGKILL)
        leader.wait(timeout=10)
        assert wait_until(lambda: not hostos.group_alive(leader.pid), timeout=10)
        hostos.kill_group(leader.pid, hostos.SIGKILL)  # gone already: no error
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_fchmod_and_the_login_shell(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        hostos.fchmod(fd, path, 0o640)
    finally:
        os.close(fd)
    assert path.stat().st_mode & 0o777 == 0o640
    assert os.access(hostos.login_shell(), os.X_OK)
