"""The ssh side of a detachable session: bytes between the ssh channel and the host.

The process ssh starts only copies bytes, so when the channel is lost only this
process dies; the session (mount, spool, jobs) lives on in its host (``host.py``).
A new session's host is started here, detached (its own session, ``setsid``), and
handed one end of a socket pair; a re-attach connects to the host's socket in the
0700 session directory. The relay ends when the host's side does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from ..wire import resume
from . import hostos

HOST_SOCKET = "host.sock"
HOST_STATE = "host.json"  # written by the host: attached or since when detached


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(channel_in: int, channel_out: int, sock: socket.socket) -> int:
    """Copy both ways until the host's side ends. The channel's EOF is passed on as a
    half-close, so the host still gets its last word (a refusal) through."""

    def upstream() -> None:
        try:
            while data := os.read(channel_in, 1 << 16):
                sock.sendall(data)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()
    try:
        while data := sock.recv(1 << 16):
            _write_all(channel_out, data)
    except OSError:
        pass
    return 0


def start_host(host_args: list[str]) -> socket.socket:
    """Start a detached session host; returns our end of its first connection."""
    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-m", "topyaz_mount.agent", "--host-fd", str(theirs.fileno())]
    subprocess.Popen(
        argv + host_args,
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
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
