"""Bigger pipe buffers for the channel.

A Linux pipe holds 64 KiB by default, so a 1 MiB chunk crosses it in 16 reads and 16
wake-ups on each side. Raising it to 1 MiB (the unprivileged maximum) lets each side
move a whole chunk per system call. Failure is harmless: the pipe just stays small.
"""

from __future__ import annotations

import sys

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python >= 3.10 names it; Linux only)


def widen(fd: int, size: int = 1 << 20) -> None:
    if not sys.platform.startswith("linux"):
        return
    import fcntl

    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass  # not a pipe (a socket from sshd, say), or the limit is lower here
