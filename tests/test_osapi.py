"""osapi.py: the client's OS seam, both implementations where this machine can run them.

The portable implementation is what macOS runs; on Linux it is exercised here directly
and, in CI, by the jail, file-server and session suites run again with
TOPYAZ_MOUNT_PORTABLE=1. Its macOS-only branches (F_FULLFSYNC, LOCAL_PEERCRED) cannot
run here: the xucred parsing is checked on bytes laid out as macOS returns them.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import blake3
import pytest
import trio

from topyaz_mount.client import fileserver, jail, osapi
from topyaz_mount.client.fileserver import TEMP_MARK, FileServer
from topyaz_mount.wire import proto

IMPLEMENTATIONS = [osapi.PortableCalls()] + (
    [osapi.LinuxCalls()] if sys.platform == "linux" else []
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda calls: calls.name)
def calls(request, monkeypatch):
    """Each implementation, installed where the jail and the file server look for it."""
    monkeypatch.setattr(jail, "OS", request.param)
    monkeypatch.setattr(fileserver, "OS", request.param)
    return request.param


def test_choice_follows_platform_and_override(monkeypatch):
    monkeypatch.delenv(osapi.PORTABLE_ENV, raising=False)
    assert osapi.choose().name == ("linux" if sys.platform == "linux" else "portable")
    monkeypatch.setenv(osapi.PORTABLE_ENV, "1")
    assert osapi.choose().name == "portable"
    monkeypatch.setenv(osapi.PORTABLE_ENV, "0")
    assert osapi.choose().name == ("linux" if sys.platform == "linux" else "portable")


def test_portable_temp_is_named_private_and_exclusive(tmp_path):
    portable = osapi.PortableCalls()
    dfd = os.open(tmp_path, portable.DIR_FLAGS)
    try:
        fd, named = portable.create_temp(dfd, b".a.tmcommit-0123456789ab")
        os.close(fd)
        assert named
        st = os.lstat(tmp_path / ".a.tmcommit-0123456789ab")
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with pytest.raises(FileExistsError):
            portable.create_temp(dfd, b".a.tmcommit-0123456789ab")
        os.symlink("elsewhere", tmp_path / ".b.tmcommit-0123456789ab")
        with pytest.raises(FileExistsError):  # never through a planted symlink
            portable.create_temp(dfd, b".b.tmcommit-0123456789ab")
        assert not (tmp_path / "elsewhere").exists()
        with pytest.raises(OSError) as e:
            portable.link_temp(fd, b"x", dfd)
        assert e.value.errno == errno.ENOTSUP
    finally:
        os.close(dfd)


def test_walking_fd_refuses_symlinks_and_files(tmp_path, calls):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"x")
    os.symlink("d", tmp_path / "link")
    root = os.open(tmp_path, calls.DIR_FLAGS)
    try:
        os.close(os.open(b"d", calls.DIR_FLAGS, dir_fd=root))
        for name, code in ((b"link", (errno.ELOOP, errno.ENOTDIR)), (b"f", (errno.ENOTDIR,))):
            with pytest.raises(OSError) as e:
                os.open(name, calls.DIR_FLAGS, dir_fd=root)
            assert e.value.errno in code
    finally:
        os.close(root)


def test_commit_through_each_implementation(tmp_path, calls):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    server = FileServer(root)
    try:
        data = os.urandom(300_000)
        trio.run(server.handle, proto.CommitBegin(1, b"out/a.tif", 0o644))
        temps = [n for n in os.listdir(root / "out") if TEMP_MARK.decode() in n]
        assert len(temps) == (1 if calls.name == "portable" else 0)
        server.handle_chunk(proto.CommitChunk(1, 0, data))
        digest = blake3.blake3(data).digest()
        trio.run(server.handle, proto.CommitEnd(1, len(data), digest))
    finally:
        server.close()
    assert (root / "out" / "a.tif").read_bytes() == data
    assert os.listdir(root / "out") == ["a.tif"]


def _age(path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_leftovers_of_killed_commits_are_collected(tmp_path, calls):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    (root / "other").mkdir()
    old = root / "out" / ".a.tif.tmcommit-0123456789ab"
    fresh = root / "out" / ".b.tif.tmcommit-ba9876543210"  # another session's live commit
    lookalike = root / "out" / ".c.tif.tmcommit-notours"  # not our naming: the user's
    untouched = root / "other" / ".d.tif.tmcommit-0123456789ab"  # no commit goes there
    for p in (old, fresh, lookalike, untouched):
        p.write_bytes(b"partial")
    for p in (old, lookalike, untouched):
        _age(p, fileserver.LEFTOVER_AGE + 60)
    server = FileServer(root)
    try:
        data = b"new output"
        trio.run(server.handle, proto.CommitBegin(1, b"out/e.tif", 0o644))
        server.handle_chunk(proto.CommitChunk(1, 0, data))
        trio.run(server.handle, proto.CommitEnd(1, len(data), blake3.blake3(data).digest()))
    finally:
        server.close()
    assert not old.exists()
    assert fresh.read_bytes() == b"partial"
    assert lookalike.read_bytes() == b"partial"
    assert untouched.read_bytes() == b"partial"
    assert (root / "out" / "e.tif").read_bytes() == data


def test_a_killed_portable_client_leaves_a_temp_the_next_session_collects(tmp_path):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import os, trio
        from topyaz_mount.wire import proto
        from topyaz_mount.client.fileserver import FileServer
        server = FileServer({str(root)!r})
        trio.run(server.handle, proto.CommitBegin(1, b"out/a.tif", 0o644))
        server.handle_chunk(proto.CommitChunk(1, 0, b"half an output"))
        os.kill(os.getpid(), 9)
        """
    )
    env = {**os.environ, osapi.PORTABLE_ENV: "1", "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert proc.returncode == -9
    (left,) = os.listdir(root / "out")
    assert left.startswith(".a.tif" + TEMP_MARK.decode())
    _age(root / "out" / left, fileserver.LEFTOVER_AGE + 60)
    server = FileServer(root)
    try:
        trio.run(server.handle, proto.CommitBegin(2, b"out/a.tif", 0o644))
        server.handle_chunk(proto.CommitChunk(2, 0, b"whole"))
        trio.run(server.handle, proto.CommitEnd(2, 5, blake3.blake3(b"whole").digest()))
    finally:
        server.close()
    assert os.listdir(root / "out") == ["a.tif"]
    assert (root / "out" / "a.tif").read_bytes() == b"whole"


@pytest.mark.parametrize("calls", IMPLEMENTATIONS, ids=lambda c: c.name)
def test_peer_uid_of_a_unix_socket(calls):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert calls.peer_uid(a) == os.getuid()


def test_peer_uid_refused_is_none():
    class Refusing:
        def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
            raise OSError(errno.ENOPROTOOPT, "no such option")

    for calls in IMPLEMENTATIONS:
        assert calls.peer_uid(Refusing()) is None


def test_xucred_as_macos_lays_it_out():
    groups = [20, 12, 61] + [0] * 13
    buf = struct.pack("=IIh2x16I", osapi.XUCRED_VERSION, 501, 3, *groups)
    assert len(buf) == osapi._XUCRED_SIZE
    assert osapi.uid_from_xucred(buf) == 501
    assert osapi.uid_from_xucred(struct.pack("=II", 7, 501)) is None  # unknown version
    assert osapi.uid_from_xucred(b"\0\0") is None


def test_flush_and_process_fd(tmp_path, calls):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x")
        calls.flush(fd)
    finally:
        os.close(fd)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = calls.process_fd(proc.pid)
    try:
        assert (pidfd is None) == (calls.name == "portable")
    finally:
        if pidfd is not None:
            os.close(pidfd)
        proc.wait()


def _served_as_nobody(root: Path, rel: bytes) -> str:
    """Whether the jail (with the OS calls in place) serves ``rel`` to user nobody:
    "served" or the errno name; checked in a forked child that drops root."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        answer = b"served"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            j = jail.Jail(root)
            try:
                os.close(j.open_read(rel))
            finally:
                j.close()
        except OSError as e:
            answer = errno.errorcode.get(e.errno or 0, "?").encode()
        os.write(write_end, answer)
        os._exit(0)
    os.close(write_end)
    try:
        answer = os.read(read_end, 100).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_a_directory_without_read_permission(calls):
    """What the portable walk changes: an O_PATH fd needs only search (x) permission on
    a directory, an O_RDONLY one needs read (r) too."""
    base = Path(tempfile.mkdtemp(prefix="topyaz-osapi-"))
    try:
        (base / "dropbox").mkdir()
        (base / "dropbox" / "a.jpg").write_bytes(b"image")
        for p in (base, base / "dropbox", base / "dropbox" / "a.jpg"):
            os.chown(p, 65534, 65534)
        os.chmod(base, 0o755)
        os.chmod(base / "dropbox", 0o311)  # enter, not list
        expected = "served" if calls.name == "linux" else "EACCES"
        assert _served_as_nobody(base, b"dropbox/a.jpg") == expected
    finally:
        shutil.rmtree(base)
