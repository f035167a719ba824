"""The command-line side of a long-lived session: exec, shell, status and unmount.

Each of these is a short-lived process that talks to ``topyaz-mount mount`` over its
control socket (control.py) and behaves like the one-shot command it stands for:
output, exit status, Ctrl-C and (for ``shell``) the terminal work as over ssh.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import trio

from ..errors import ConnectionFailed, TopyazMountError
from . import control, progress

Say = Callable[[str], None]


class SessionCommandFailed(TopyazMountError):
    """The session refused or could not run the command (its message, its status)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def terminal_size(fd: int = 0) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        if rows and cols:
            return rows, cols
    except OSError:
        pass
    return 24, 80


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Keys go to the remote terminal as typed (Ctrl-C included); restored after."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _read_stdin(channel: control.Channel) -> None:
    """Local stdin to the job, read in a thread so the terminal stays blocking."""
    while True:
        data = await trio.to_thread.run_sync(os.read, 0, 1 << 16, abandon_on_cancel=True)
        if not data:
            await channel.send(control.StdinClose())
            return
        await channel.send(control.StdinData(data))


async def _forward_signals(channel: control.Channel, say: Say) -> None:
    """First Ctrl-C goes to the remote job, a second kills it."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                say("stopping the remote command…")
                await channel.send(control.SignalJob(signum))
            else:
                say("killing the remote command…")
                await channel.send(control.SignalJob(signal.SIGKILL))


async def _forward_resizes(channel: control.Channel) -> None:
    with trio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            rows, cols = terminal_size()
            await channel.send(control.Resize(rows, cols))


def writer(stream: Any) -> Callable[[bytes], None]:
    """A sink that writes and flushes at once, so output interleaves as it happens."""

    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


async def run_in_session(
    name: str,
    req: control.Exec,
    say: Say,
    *,
    interactive: bool = False,
    display: str | None = None,
) -> control.Finished:
    """Send one command to session ``name``; stream its output; its result.

    ``display``: the command's live progress on stderr, as for the one-shot exec
    (``"line"`` or ``"json"``); the session sends its figures (``control.Figures``)."""
    line = progress.TerminalLine() if display == "line" else None
    shown = line or (progress.JsonLines() if display == "json" else None)
    if shown is not None:
        req = msgspec.structs.replace(req, progress=0.5 if line else 1.0)
    out, err = writer(sys.stdout.buffer), writer(sys.stderr.buffer)
    if line is not None:
        out, err = line.around(out), line.around(err)
    try:
        return await _exchange(name, req, say, interactive, out, err, shown)
    finally:
        if line is not None:
            line.close()


async def _exchange(
    name: str,
    req: control.Exec,
    say: Say,
    interactive: bool,
    out: Callable[[bytes], None],
    err: Callable[[bytes], None],
    shown: progress.TerminalLine | progress.JsonLines | None,
) -> control.Finished:
    channel = await control.connect(name)
    async with channel, trio.open_nursery() as nursery:
        await channel.send(req)
        if req.stdin:
            nursery.start_soon(_read_stdin, channel)
        if interactive:
            nursery.start_soon(_forward_resizes, channel)
        nursery.start_soon(_forward_signals, channel, say)
        while True:
            msg = await channel.receive()
            if isinstance(msg, control.Output):
                (out if msg.fd == 1 else err)(msg.data)
            elif isinstance(msg, control.Note):
                say(msg.text)
            elif isinstance(msg, control.Figures):
                if shown is not None:
                    shown.show(progress.Progress(**msg.figures))  # type: ignore[arg-type]
            elif isinstance(msg, control.Finished):
                nursery.cancel_scope.cancel()
                return msg
            elif isinstance(msg, control.Failed):
                raise SessionCommandFailed(msg.message, msg.exit_code)
            elif msg is None:
                raise ConnectionFailed(f"session {name} ended before the command finished")
    raise AssertionError("unreachable")


async def query(name: str) -> dict[str, Any]:
    channel = await control.connect(name)
    async with channel:
        await channel.send(control.Query())
        msg = await channel.receive()
    if not isinstance(msg, control.Info):
        raise ConnectionFailed(f"session {name} did not answer")
    return dict(msg.info)


async def all_sessions() -> list[dict[str, Any]]:
    """Every live session's status; sockets of dead ones are removed."""
    found = []
    for name in control.session_names():
        try:
            found.append(await query(name))
        except control.ControlError:
            with contextlib.suppress(OSError):
                os.unlink(control.socket_path(name))
        except ConnectionFailed:
            continue
    return found


async def unmount(name: str, force: bool, say: Say) -> control.Unmounted:
    channel = await control.connect(name)
    async with channel:
        await channel.send(control.Unmount(force))
        while True:
            msg = await channel.receive()
            if isinstance(msg, control.Note):
                say(msg.text)
            elif isinstance(msg, control.Unmounted):
                break
            elif msg is None:
                raise ConnectionFailed(f"session {name} ended without confirming the unmount")
    with trio.move_on_after(10):  # the session removes its socket as it exits
        while control.socket_path(name).exists():
            await trio.sleep(0.05)
    return msg
