"""``exec`` through a running session's control socket, in plain blocking Python.

This is the path of every exec that reuses a session (``--session NAME``, or one found
by its reuse key, persist.py), so it imports no trio (a tenth of a second of start-up):
one blocking unix socket, a thread for stdin, signal handlers that send what the
user typed. The command behaves as the one-shot exec: output as it comes, the exit
status, Ctrl-C to the job (a second one kills it).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from ..errors import ConnectionFailed, TopyazMountError
from . import control, progress

Say = Callable[[str], None]


class SessionCommandFailed(TopyazMountError):
    """The session refused or could not run the command (its message, its status)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SessionEnding(SessionCommandFailed):
    """The session is on its way out and took no command (an exec may start another)."""


def connect(name: str) -> socket.socket:
    path = control.checked_socket(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise control.unreachable(name, e) from None
    return sock


def writer(stream: Any) -> Callable[[bytes], None]:
    """A sink that writes and flushes at once, so output interleaves as it happens."""

    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Keys go to the remote terminal as typed (Ctrl-C included); restored after."""
    import os
    import termios
    import tty

    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size(fd: int = 0) -> tuple[int, int]:
    import fcntl
    import struct
    import termios

    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        if rows and cols:
            return rows, cols
    except OSError:
        pass
    return 24, 80


def run(
    name: str,
    req: control.Exec,
    say: Say,
    *,
    interactive: bool = False,
    sock: socket.socket | None = None,
    display: str | None = None,
) -> control.Finished:
    """Send one command to session ``name`` (over ``sock`` when connected already);
    stream its output; its result. ``interactive``: a terminal's (``shell``): its size
    follows the local one's. ``display``: the command's live progress on stderr, as
    for the one-shot exec (``"line"`` or ``"json"``), from the figures the session
    sends (``control.Figures``)."""
    line = progress.TerminalLine() if display == "line" else None
    shown = line or (progress.JsonLines() if display == "json" else None)
    if shown is not None:
        req = msgspec.structs.replace(req, progress=0.5 if line else 1.0)
    out, err = writer(sys.stdout.buffer), writer(sys.stderr.buffer)
    if line is not None:
        out, err = line.around(out), line.around(err)
    try:
        return _exchange(name, sock or connect(name), req, say, interactive, out, err, shown)
    finally:
        if line is not None:
            line.close()


def _exchange(
    name: str,
    sock: socket.socket,
    req: control.Exec,
    say: Say,
    interactive: bool,
    out: Callable[[bytes], None],
    err: Callable[[bytes], None],
    shown: Any,
) -> control.Finished:
    lock = threading.Lock()

    def send(msg: control.Message) -> None:
        with lock, contextlib.suppress(OSError):
            sock.sendall(control.frame(msg))

    with sock:
        send(req)
        if req.stdin:
            threading.Thread(target=_read_stdin, args=(send,), daemon=True).start()
        with _forwarding_signals(send, say, interactive):
            buf = bytearray()
            while True:
                msg = control.take(buf)
                if msg is None:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise ConnectionFailed(f"session {name} ended before the command finished")
                    buf += data
                elif isinstance(msg, control.Output):
                    (out if msg.fd == 1 else err)(msg.data)
                elif isinstance(msg, control.Note):
                    say(msg.text)
                elif isinstance(msg, control.Figures):
                    if shown is not None:
                        shown.show(progress.Progress(**msg.figures))  # type: ignore[arg-type]
                elif isinstance(msg, control.Finished):
                    return msg
                elif isinstance(msg, control.Failed):
                    failed = SessionEnding if msg.ending else SessionCommandFailed
                    raise failed(msg.message, msg.exit_code)


def _read_stdin(send: Callable[[control.Message], None]) -> None:
    import os

    while data := os.read(0, 1 << 16):
        send(control.StdinData(data))
    send(control.StdinClose())


@contextlib.contextmanager
def _forwarding_signals(
    send: Callable[[control.Message], None], say: Say, interactive: bool
) -> Iterator[None]:
    """First Ctrl-C (or SIGTERM/SIGHUP) goes to the remote job, later ones kill it;
    ``interactive``: a new window size goes too."""
    count = 0

    def resized(signum: int, frame: object) -> None:
        send(control.Resize(*terminal_size()))

    def handler(signum: int, frame: object) -> None:
        nonlocal count
        count += 1
        if count == 1:
            say("stopping the remote command…")
            send(control.SignalJob(signum))
        else:
            say("killing the remote command…")
            send(control.SignalJob(signal.SIGKILL))

    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {s: signal.signal(s, handler) for s in signums}
    if interactive:
        saved[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resized)
    try:
        yield
    finally:
        for s, old in saved.items():
            signal.signal(s, old)
