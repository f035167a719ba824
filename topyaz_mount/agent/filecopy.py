"""Copying a file's bytes on the remote: shared extents where possible, never a link.

Used wherever the agent takes a copy it may hand to someone who writes (the stage
backend's inputs, the spool's adopted files, the store's copies of outputs): a reflink
is copy-on-write, so neither side ever sees the other's later writes; a hardlink
would let a job write through into the content store.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from ..wire import proto
from . import hostos

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def clone(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst`` a reflink of all of ``src`` where the file system has them (Linux
    btrfs, XFS): shared extents, copy-on-write. False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError:
        return False
    return True


def reflinks_work(directory: Path) -> bool:
    """Whether the file system of ``directory`` makes reflinks (tried once, on two
    small files of ours)."""
    src, dst = directory / ".reflink-probe-a", directory / ".reflink-probe-b"
    fds = []
    try:
        for path in (src, dst):
            fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | hostos.CLOEXEC, 0o600))
        os.write(fds[0], b"probe")
        return clone(fds[0], fds[1])
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
        for path in (src, dst):
            path.unlink(missing_ok=True)


def clone_or_copy(src_fd: int, dst_fd: int, size: int) -> None:
    """``dst`` gets the first ``size`` bytes of ``src``: a reflink where the file
    system has one, else ``copy_file_range`` (Linux), else reads and writes. Raises
    EIO if ``src`` holds fewer bytes."""
    if os.fstat(src_fd).st_size == size and clone(src_fd, dst_fd):
        return
    offset = 0
    while offset < size:
        n = 0
        if hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
            except OSError as e:  # EXDEV: two file systems; the others: not supported
                if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if n == 0:
            data = hostos.pread(src_fd, min(proto.CHUNK_SIZE, size - offset), offset)
            if not data:
                raise OSError(errno.EIO, "the source ended early")
            n = hostos.pwrite(dst_fd, data, offset)
        offset += n
