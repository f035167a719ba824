"""Client-side file access confined to the root, whatever the agent asks for.

Every path is root-relative bytes, checked component by component: no empty parts,
no ``.`` or ``..``, no NUL, nothing absolute. Directories are walked with
``O_NOFOLLOW | O_DIRECTORY`` fds (``O_PATH`` ones on Linux, see osapi.py) relative to
the previous one, so a symlink
anywhere but the last component stops the walk, and the last component is never
followed either: symlinks are reported as links and the kernel on the remote follows
them through the mount, where they can only lead to paths we check again.
Special files (devices, FIFOs, sockets) are neither listed nor opened, and no mode
set here keeps a setuid, setgid or sticky bit (``policy.safe_mode``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError
from ..policy import root_refusal, safe_mode
from .osapi import OS
from .spelling import Spelling

MAX_PATH = 4096


class JailError(OSError):
    """A request that tries to leave the root or touch what we do not serve."""


def split_path(rel: bytes) -> list[bytes]:
    """Validated components of a root-relative path (``b""`` is the root itself)."""
    if not isinstance(rel, bytes):
        raise JailError(errno.EINVAL, "path must be bytes")
    if len(rel) > MAX_PATH:
        raise JailError(errno.ENAMETOOLONG, "path too long")
    if rel == b"":
        return []
    if b"\x00" in rel:
        raise JailError(errno.EINVAL, "NUL byte in path")
    if rel.startswith(b"/"):
        raise JailError(errno.EPERM, "absolute path refused")
    parts = rel.split(b"/")
    for part in parts:
        if part in (b"", b".", b".."):
            raise JailError(errno.EPERM, f"path component {part!r} refused")
        if len(part) > 255:
            raise JailError(errno.ENAMETOOLONG, "name too long")
    return parts


def checked_root(root: str | os.PathLike[str], allow_home: bool = False) -> Path:
    """``root`` resolved (symlinks too) and spelled as stored (so that arguments typed
    in another case on a Mac volume are found under it), if it may be exposed to the
    remote at all; else a UsageError, raised before any connection is made."""
    real = Spelling()(os.path.realpath(root))
    if not os.path.isdir(real):
        raise UsageError(f"--root {os.fspath(root)}: not a directory")
    home = os.path.realpath(os.path.expanduser("~"))
    why = root_refusal(real, home, allow_home)
    if why is not None:
        raise UsageError(f"--root {os.fspath(root)}: {why}")
    return Path(real)


def is_special(mode: int) -> bool:
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


class Jail:
    """Filesystem calls on paths beneath one root directory, and nowhere else."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(os.path.realpath(root))
        self._root_fd = os.open(self.root, OS.DIR_FLAGS)

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    @contextmanager
    def _dir(self, parts: list[bytes]) -> Iterator[int]:
        """A walking fd of the directory ``parts`` (symlinks refused on the way)."""
        fd = os.dup(self._root_fd)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, OS.DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise JailError(errno.ENOTDIR, "not a directory inside the root") from None
                    raise
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent(self, rel: bytes) -> Iterator[tuple[int, bytes]]:
        """(directory fd, final name) for a non-root path."""
        parts = split_path(rel)
        if not parts:
            raise JailError(errno.EPERM, "the root itself cannot be changed")
        with self._dir(parts[:-1]) as fd:
            yield fd, parts[-1]

    # --- reading --------------------------------------------------------------------

    def lstat(self, rel: bytes) -> os.stat_result:
        parts = split_path(rel)
        if not parts:
            return os.stat(self._root_fd)
        with self._dir(parts[:-1]) as fd:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if is_special(st.st_mode):
            raise JailError(errno.EACCES, "special files are not served")
        return st

    def listdir(self, rel: bytes) -> list[tuple[bytes, os.stat_result]]:
        parts = split_path(rel)
        with self._dir(parts) as pfd:
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        try:
            entries = []
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished while listing
                    if not is_special(st.st_mode):
                        entries.append((os.fsencode(entry.name), st))
            return entries
        finally:
            os.close(fd)

    def open_read(self, rel: bytes) -> int:
        """A read fd of a regular file; O_NONBLOCK so a FIFO raced in cannot hang us."""
        with self.parent(rel) as (fd, name):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                file_fd = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise JailError(errno.ELOOP, "symlinks are not followed") from None
                raise
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise JailError(errno.EACCES, "only regular files are served")
        return file_fd

    def readlink(self, rel: bytes) -> bytes:
        with self.parent(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self._root_fd)

    # --- changing -------------------------------------------------------------------

    def mkdir(self, rel: bytes, mode: int) -> None:
        with self.parent(rel) as (fd, name):
            os.mkdir(name, safe_mode(mode), dir_fd=fd)

    def rmdir(self, rel: bytes) -> None:
        with self.parent(rel) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def unlink(self, rel: bytes) -> None:
        with self.parent(rel) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise JailError(errno.EISDIR, "is a directory")
            os.unlink(name, dir_fd=fd)

    def rename(self, old: bytes, new: bytes, noreplace: bool = False) -> None:
        with self.parent(old) as (ofd, oname), self.parent(new) as (nfd, nname):
            if noreplace:
                try:
                    os.stat(nname, dir_fd=nfd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise JailError(errno.EEXIST, "destination exists")
            os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)

    def symlink(self, rel: bytes, target: bytes) -> None:
        with self.parent(rel) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def chmod(self, rel: bytes, mode: int) -> None:
        with self.parent(rel) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return  # Linux has no link modes
            os.chmod(name, safe_mode(mode), dir_fd=fd)

    def utime(self, rel: bytes, atime_ns: int | None, mtime_ns: int | None) -> None:
        with self.parent(rel) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            times = (
                atime_ns if atime_ns is not None else st.st_atime_ns,
                mtime_ns if mtime_ns is not None else st.st_mtime_ns,
            )
            os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)
