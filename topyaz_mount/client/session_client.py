"""The command-line side of a long-lived session: status and unmount (exec and shell
are session_exec.py's), over its control socket (control.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import trio

from ..errors import ConnectionFailed
from . import control, runtime

Say = Callable[[str], None]


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
    for name in runtime.session_names():
        try:
            found.append(await query(name))
        except control.ControlError:
            with contextlib.suppress(OSError):
                os.unlink(runtime.socket_path(name))
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
        while runtime.socket_path(name).exists():
            await trio.sleep(0.05)
    return msg
