"""The agent's OS calls that differ between POSIX hosts and Windows, chosen in one place.

The stage path of the agent (everything but ``fs.py`` and ``fuse_backend.py``) calls
these instead of the POSIX-only ones, so it type-checks for Linux, macOS and Windows
(``mypy --platform``). Linux and macOS run the POSIX branch, which is what the tests
run. The Windows branch was not run here (no Windows host): it is written from the
documented calls and only type-checked; see winhost.py for the Windows job control.
The one Windows choice that does run here is the ssh channel moved by threads
(``channel``, threadstream.py): ``TOPYAZ_MOUNT_PORTABLE=1`` picks it on Linux too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

# Flags that only mean something on POSIX; 0 (no effect) on Windows.
CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
BINARY: int = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
SIGKILL: int = getattr(signal, "SIGKILL", 9)
SIGTERM: int = signal.SIGTERM

log = logging.getLogger(__name__)

# The client's switch to its portable OS calls (client/osapi.py); here it makes the
# agent move its ssh channel by threads as on Windows, which is how the tests run that.
PORTABLE_ENV = "TOPYAZ_MOUNT_PORTABLE"

_seek_lock = threading.Lock()  # Windows: seek + read/write as one step


def pread(fd: int, n: int, offset: int) -> bytes:
    if sys.platform == "win32":
        with _seek_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, n)
    return os.pread(fd, n, offset)


def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
    if sys.platform == "win32":
        with _seek_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.write(fd, data)
    return os.pwrite(fd, data, offset)


# Bulk data (a fetched chunk) goes to disk at most this much per call: on the test VM a
# 1 GiB file written 1 MiB a call took 4-5 times the kernel time of 256 KiB a call
# (large page-cache folios came from memory the hypervisor must fault in again);
# elsewhere it costs nothing measurable.
WRITE_PIECE = 256 << 10


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """All of ``data`` at ``offset``, in pieces of at most WRITE_PIECE."""
    view = memoryview(data)
    while view:
        n = pwrite(fd, view[:WRITE_PIECE], offset)
        view = view[n:]
        offset += n


def lock(fd: int, *, exclusive: bool, wait: bool = True) -> None:
    """A whole-file advisory lock (``flock``); raises BlockingIOError when ``wait`` is
    False and another holds it. Windows has no shared locks: a shared lock is not
    taken there (readers do not exclude each other anyway) and an exclusive one is a
    one-byte ``msvcrt.locking`` lock, which excludes only other exclusive lockers."""
    if sys.platform == "win32":
        if not exclusive:
            return
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        except OSError as e:
            raise BlockingIOError(str(e)) from None
        return
    import fcntl

    how = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fcntl.flock(fd, how if wait else how | fcntl.LOCK_NB)


def kill_group(pgid: int, sig: int) -> None:
    """``sig`` to the process group ``pgid`` (a job's); gone already is fine."""
    try:
        if sys.platform == "win32":
            from .winhost import JobObject

            JobObject(pgid).signal(sig)
        else:
            os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is left."""
    if sys.platform == "win32":
        try:
            os.kill(pgid, 0)  # on Windows: whether the leader can be opened
        except OSError:
            return False
        return True
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fchmod(fd: int, path: str | os.PathLike[str], mode: int) -> None:
    """Set the mode of an open file (by path on Windows, which has only the read-only bit)."""
    if sys.platform == "win32":
        os.chmod(path, mode)
    else:
        os.fchmod(fd, mode)


def login_shell() -> str:
    """The user's login shell (``topyaz-mount shell``); cmd.exe on Windows."""
    if sys.platform == "win32":
        return os.environ.get("COMSPEC", "cmd.exe")
    import pwd

    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    return shell if shell and os.access(shell, os.X_OK) else "/bin/sh"


def channel(channel_in: int, channel_out: int) -> trio.abc.HalfCloseableStream:
    """The ssh channel (the agent's stdin and stdout, dup'ed) as one trio stream.

    POSIX: trio waits on the pipes itself (``FdStream``). Windows: they are plain pipe
    handles trio cannot wait on, so threads move the bytes (threadstream.py), in binary
    mode. ``TOPYAZ_MOUNT_PORTABLE=1`` takes the threaded one on POSIX too."""
    import trio

    from .threadstream import ThreadedStream

    if sys.platform == "win32":
        import msvcrt

        for fd in (channel_in, channel_out):
            msvcrt.setmode(fd, os.O_BINARY)  # no newline translation of the frames
        return ThreadedStream(channel_in, channel_out)
    if os.environ.get(PORTABLE_ENV, "") not in ("", "0"):
        log.info("the ssh channel moves by threads, as on Windows (%s)", PORTABLE_ENV)
        return ThreadedStream(channel_in, channel_out)
    return trio.StapledStream(
        trio.lowlevel.FdStream(channel_out), trio.lowlevel.FdStream(channel_in)
    )
