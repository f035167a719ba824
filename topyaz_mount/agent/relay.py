"""The ssh side of a detachable session: hands the ssh channel to the session's host.

The process ssh starts passes its stdin and stdout to the host (``host.py``) over a
unix socket and waits, so when the channel is lost only this process ends; the session
(mount, spool, jobs) lives on in its host. The bytes go between sshd and the host
directly: an earlier relay that copied them cost 12-23 % of a loopback batch. A new
session's host is forked from this process, detached (its own session, ``setsid``), and
handed one end of a socket pair; a re-attach connects to the host's socket in the 0700
session directory. The relay ends when the host lets the connection go.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from ..wire import resume
from . import hostos

HOST_SOCKET = "host.sock"
HOST_STATE = "host.json"  # written by the host: attached or since when detached


def relay(channel_in: int, channel_out: int, sock: socket.socket) -> int:
    """Hand the ssh channel's two fds to the host (``SCM_RIGHTS``), which reads and
    writes them itself, so no byte of the session passes through this process; then
    wait until the host lets the connection go (it closes its end of ``sock``): ssh's
    session ends with this process."""
    if sys.platform == "win32":  # no AF_UNIX there: no detachable session
        return 1
    try:
        socket.send_fds(sock, [b"C"], [channel_in, channel_out])
    except OSError:
        return 1
    for fd in {channel_in, channel_out}:
        os.close(fd)  # the host holds them now: its close is the channel's end
    try:
        while sock.recv(1 << 10):
            pass
    except OSError:
        pass
    return 0


def start_host(
    run_host: Callable[[socket.socket], int], drop_fds: tuple[int, ...]
) -> socket.socket:
    """Fork a detached session host running ``run_host`` on one end of a socket pair;
    returns our end, its first connection.

    A fork, not a new interpreter: this process has imported everything the host runs,
    and a second Python start was 0.12 s of every new session (trio alone is 57 ms). It
    happens before any thread or event loop exists. The child lets go of ``drop_fds``
    (ssh's channel: it is handed over, like a re-attach's, through the socket)."""
    if sys.platform == "win32":  # no fork there, and no detachable session (relay)
        raise OSError(errno.ENOSYS, "no detachable sessions on Windows hosts")
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            for fd in drop_fds:
                os.close(fd)
            os.setsid()
            code = run_host(theirs)
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - into the host's log, then its status
            traceback.print_exc()
        finally:
            os._exit(code)  # never back into the relay's code, its finally blocks or atexit
    theirs.close()
    return ours


def connect_host(sessions_dir: Path, session_id: str) -> socket.socket | None:
    """The running host of ``session_id``, or None (ended, or never here)."""
    if not resume.SESSION_ID.match(session_id) or sys.platform == "win32":
        return None  # Windows: no re-attach to a running session (not built)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(str(sessions_dir / session_id / HOST_SOCKET))
    except OSError:
        sock.close()
        return None
    return sock


def list_hosts(sessions_dir: Path) -> list[dict]:
    """The detachable sessions on this host whose host still runs (holds its lock)."""
    found: list[dict] = []
    if not sessions_dir.is_dir():
        return found
    for entry in sorted(sessions_dir.iterdir()):
        try:
            state = json.loads((entry / HOST_STATE).read_text())
            fd = os.open(entry / "agent.lock", os.O_RDONLY | hostos.CLOEXEC)
        except (OSError, ValueError):
            continue
        try:
            hostos.lock(fd, exclusive=False, wait=False)
            continue  # nobody holds it: the host is gone
        except BlockingIOError:
            if isinstance(state, dict):
                found.append(state)
        finally:
            os.close(fd)
    return found
