"""Ask the kernel for a job's dirty output pages early, so write-back can stream.

With the kernel's writeback cache on (without it every write(2) is one request to us),
what the job writes sits in the remote page cache until the kernel's flusher sends it:
for a FUSE mount, once tens of megabytes are dirty, or at close. An output streamed
home while it is written (spool.py) then trails the writer by that much, and the job's
end waits for the rest (seen: 2.2 s at 25 MB/s, a 200 MiB output written at the
link's rate).

So while a new output stays open for writing, the agent opens it through its own mount
and asks the kernel to start writing its dirty pages back (``sync_file_range`` with
SYNC_FILE_RANGE_WRITE, which does not wait for them) every ``EVERY`` seconds. Every
call on that file runs in a worker thread that trio may abandon: the kernel answers it
with requests that only this process's trio thread serves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import trio

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
    if _sync_file_range is None:
        return
    await trio.sleep(EVERY)
    if not still_writing():
        return
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = await trio.to_thread.run_sync(os.open, path, flags, abandon_on_cancel=True)
    except OSError as e:
        log.debug("cannot follow %s: %s", path, e)
        return
    try:
        while still_writing():
            await trio.to_thread.run_sync(start_writeback, fd, abandon_on_cancel=True)
            await trio.sleep(EVERY)
    except OSError as e:
        log.debug("stopped following %s: %s", path, e)
    finally:
        # Closing sends FLUSH and RELEASE: never wait for that on the trio thread.
        threading.Thread(target=os.close, args=(fd,), daemon=True).start()
