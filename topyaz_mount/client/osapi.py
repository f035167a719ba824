"""Every OS-specific call of the client side, behind one seam chosen once.

The client runs where the user's files are, which is often a Mac. Linux gets its own
calls where they are better; everything else (macOS, the BSDs, and Linux with
``TOPYAZ_MOUNT_PORTABLE=1``, which is how CI exercises this path) gets plain POSIX:

- the jail's directory walk: Linux opens ``O_PATH`` fds, which need only search (x)
  permission on a directory; the portable walk opens ``O_RDONLY | O_DIRECTORY``, which
  also needs read (r) permission, so a directory the user may enter but not list
  (a drop box, ``d-wx--x--x``) is served on Linux and refused (EACCES) elsewhere;
- a commit's temporary file: Linux makes it unnamed (``O_TMPFILE``) and links it in
  through ``/proc/self/fd`` once verified, so a killed client leaves nothing; the
  portable one is a hidden, exclusively created ``.<name>.tmcommit-<random>`` that a
  killed client leaves behind, and the file server collects such leftovers
  (fileserver.py, ``_collect_leftovers``);
- flushing it: ``fsync``, except on macOS, where fsync stops at the drive's cache and
  only ``F_FULLFSYNC`` reaches the platter; and while its data arrives, Linux starts
  writing it back (``sync_file_range``), so the fsync at the end has little left to
  wait for; elsewhere the fsync does it all;
- who is at the other end of the control socket: ``SO_PEERCRED`` on Linux,
  ``LOCAL_PEERCRED`` (an xucred) on macOS and the BSDs;
- waiting for ssh to exit (a pidfd on Linux, polling elsewhere) and widening its pipes
  (``F_SETPIPE_SZ`` exists on Linux only);
- whether the CPU has AES instructions (ciphers.py): ``/proc/cpuinfo`` on Linux; every
  Mac has them.

Callers use ``OS`` and never look at the platform themselves.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
from typing import Protocol

from .. import pipes

PORTABLE_ENV = "TOPYAZ_MOUNT_PORTABLE"

# <sys/un.h> on macOS and FreeBSD: getsockopt(fd, SOL_LOCAL, LOCAL_PEERCRED) gives a
# struct xucred {u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]}.
SOL_LOCAL = 0
LOCAL_PEERCRED = 1
XUCRED_VERSION = 0
_XUCRED_HEAD = struct.Struct("=II")  # cr_version, cr_uid
_XUCRED_SIZE = 4 + 4 + 4 + 16 * 4  # with the padding after cr_ngroups
_UCRED = struct.Struct("3i")  # Linux struct ucred: pid, uid, gid


class PeerSocket(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def uid_from_xucred(buf: bytes) -> int | None:
    """The peer's uid from a struct xucred, or None if it is not one we know."""
    if len(buf) < _XUCRED_HEAD.size:
        return None
    version, uid = _XUCRED_HEAD.unpack_from(buf)
    return uid if version == XUCRED_VERSION else None


class PortableCalls:
    """Plain POSIX, with macOS's stronger fsync; what the client uses off Linux."""

    name = "portable"
    # A directory fd the jail can walk from and stat, list, fsync and statvfs through.
    DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def create_temp(self, dir_fd: int, name: bytes) -> tuple[int, bool]:
        """A private write fd for a commit's data beside its destination in ``dir_fd``,
        and whether it is already named ``name`` (else ``link_temp`` names it)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, 0o600, dir_fd=dir_fd), True

    def link_temp(self, fd: int, name: bytes, dir_fd: int) -> None:
        """Give an unnamed temporary file ``name`` (only Linux makes unnamed ones)."""
        raise OSError(errno.ENOTSUP, "no unnamed temporary files here")

    def flush(self, fd: int) -> None:
        """Data and metadata of ``fd`` on stable storage before anything depends on it."""
        if sys.platform == "darwin":
            try:
                fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
                return
            except OSError:
                pass  # not supported by this volume (some network shares): plain fsync
        os.fsync(fd)

    def start_flush(self, fd: int, offset: int, length: int) -> None:
        """Start writing these bytes of ``fd`` to disk without waiting (a hint)."""

    def peer_uid(self, sock: PeerSocket) -> int | None:
        """The uid of the process at the other end of a unix stream socket."""
        if sys.platform.startswith("linux"):
            # Only reached with TOPYAZ_MOUNT_PORTABLE=1: Linux has no LOCAL_PEERCRED.
            return _ucred_uid(sock)
        try:  # macOS, FreeBSD (this branch is not run by CI, which is Linux)
            return uid_from_xucred(sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, _XUCRED_SIZE))
        except OSError:
            return None

    def process_fd(self, pid: int) -> int | None:
        """An fd that becomes readable when process ``pid`` exits, or None: poll then."""
        return None

    def widen_pipe(self, fd: int, size: int) -> None:
        """Give a pipe a bigger buffer if the OS lets us choose (harmless if not)."""

    def has_hardware_aes(self) -> bool:
        """Whether this CPU has AES instructions (ciphers.py). Every Mac a supported
        macOS runs on has them (Intel since 2010, Apple Silicon)."""
        return True


def _ucred_uid(sock: PeerSocket) -> int | None:
    """The peer's uid by Linux's SO_PEERCRED (a struct ucred)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return int(_UCRED.unpack(creds)[1])


_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)  # named by the socket module on Linux only

if sys.platform == "linux":
    import ctypes

    _SYNC_FILE_RANGE_WRITE = 2
    _sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if _sync_file_range is not None:
        _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range.restype = ctypes.c_int

    class LinuxCalls(PortableCalls):
        """Today's Linux calls: O_PATH walks, O_TMPFILE commits, SO_PEERCRED, pidfds."""

        name = "linux"
        DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

        def create_temp(self, dir_fd: int, name: bytes) -> tuple[int, bool]:
            # Unnamed until it is complete: a client killed mid-commit leaves nothing.
            try:
                flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
                return os.open(b".", flags, 0o600, dir_fd=dir_fd), False
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
            return super().create_temp(dir_fd, name)  # a file system without O_TMPFILE

        def link_temp(self, fd: int, name: bytes, dir_fd: int) -> None:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)

        def flush(self, fd: int) -> None:
            os.fsync(fd)

        def start_flush(self, fd: int, offset: int, length: int) -> None:
            if _sync_file_range is not None:  # an error only loses the head start
                _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

        def peer_uid(self, sock: PeerSocket) -> int | None:
            return _ucred_uid(sock)

        def process_fd(self, pid: int) -> int | None:
            try:
                return os.pidfd_open(pid)
            except OSError:  # an old kernel: poll
                return None

        def widen_pipe(self, fd: int, size: int) -> None:
            pipes.widen(fd, size)

        def has_hardware_aes(self) -> bool:
            """The ``aes`` CPU flag (x86 ``flags``, ARM ``Features``)."""
            try:
                with open("/proc/cpuinfo") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key.strip() in ("flags", "Features"):
                            return "aes" in value.split()
            except OSError:
                pass
            return False


def choose() -> PortableCalls:
    """The implementation for this OS (``TOPYAZ_MOUNT_PORTABLE=1``: the portable one)."""
    if sys.platform == "linux" and os.environ.get(PORTABLE_ENV, "") in ("", "0"):
        return LinuxCalls()
    return PortableCalls()


OS = choose()
