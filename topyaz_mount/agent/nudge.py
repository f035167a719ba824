"""Ask the kernel for a job's dirty output pages early, so write-back can stream.

With the kernel's writeback cache on (without it every write(2) is one request to us),
what the job writes sits in the remote page cache until the kernel's flusher sends it:
for a FUSE mount, once tens of megabytes are dirty, or at close. An output streamed
home while it is written (spool.py) then trails the writer by that much, and the job's
end waits for the rest (seen: 2.2 s at 25 MB/s, a 200 MiB output written at the
link's rate).

So while a new output stays open for writing, a helper process opens it through our
mount and asks the kernel to start writing its dirty pages back (``sync_file_range``
with SYNC_FILE_RANGE_WRITE, which does not wait for them) every ``EVERY`` seconds, until
the agent closes the helper's stdin.

A process of its own, not a thread of the agent: a process that dies holding a file
of the FUSE mount it serves cannot finish dying (its exit closes that file, and the
close waits for a FLUSH that only the dying process could answer). A killed agent then
stayed a zombie holding the ssh channel open: the client never heard it had died.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EVERY = 0.1  # outputs closed sooner are never opened here
SYNC_FILE_RANGE_WRITE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int) -> None:
    """Start writing back every dirty page of ``fd``'s file; do not wait for it."""
    assert _sync_file_range is not None
    if _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


async def follow_writer(path: Path, still_writing: Callable[[], bool]) -> None:
    """Nudge the kernel to send ``path``'s dirty pages while ``still_writing()``."""
    import trio  # here: the helper process starts without it

    if _sync_file_range is None:
        return
    await trio.sleep(EVERY)
    if not still_writing():
        return
    argv = [sys.executable, "-m", "topyaz_mount.agent.nudge", str(path)]
    try:
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE)
    except OSError as e:
        log.debug("cannot follow %s: %s", path, e)
        return
    try:
        while still_writing() and proc.returncode is None:
            await trio.sleep(EVERY)
    finally:
        with trio.CancelScope(shield=True):
            assert proc.stdin is not None
            await proc.stdin.aclose()  # the helper's cue to close the file and exit
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


def _helper(path: str) -> int:
    """The helper: nudge ``path`` every EVERY seconds until stdin ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return 1
    try:
        while not select.select([0], [], [], EVERY)[0]:
            start_writeback(fd)
    except OSError:
        return 1
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1]))
