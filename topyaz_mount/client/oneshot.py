"""The one-shot ``exec``: one connection, one mount, one command, all torn down.

Kept apart from cli.py so the command line can start ssh before it imports trio and
the client (see ``transport.spawn_ssh``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import click
import trio

from ..policy import Policy
from ..safetext import printable
from ..wire import proto
from . import progress
from .session import RunResult, Session, open_session
from .session_exec import writer
from .transport import SshSettings


def _say(text: str) -> None:
    """A line of ours on stderr, around the progress line (as cli's ``_say``)."""
    with progress.aside():
        click.echo(f"topyaz-mount: {printable(text)}", err=True)


async def _forward_signals(session: Session, abort: trio.CancelScope) -> None:
    """First Ctrl-C goes to the remote job, a second kills it, a third gives up."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                _say("stopping the remote command…")
                await session.signal(signum)
            elif count == 2:
                _say("killing the remote command…")
                await session.signal(signal.SIGKILL)
            else:
                abort.cancel()


async def exec_async(
    settings: SshSettings,
    root: str,
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    forward_stdin: bool,
    literal: Sequence[str],
    spawned: subprocess.Popen | None = None,
    policy: Policy | None = None,
    includes: Sequence[str] = (),
    display: str | None = None,
) -> RunResult | None:
    """Run ``argv`` through a new session; None if aborted by a third Ctrl-C.

    ``display``: live progress on stderr, ``"line"`` (a terminal's bottom line) or
    ``"json"`` (a JSON object a second); None for none."""
    with trio.CancelScope() as abort:
        async with open_session(
            settings,
            root,
            spawned=spawned,
            first_command=(argv, cwd),
            policy=policy,
            includes=includes,
            pipelined=True,
        ) as session:
            session.exit_after = True
            stdin = trio.lowlevel.FdStream(os.dup(0)) if forward_stdin else None
            line = progress.TerminalLine() if display == "line" else None
            shown = line or (progress.JsonLines() if display == "json" else None)
            tracker = progress.Tracker(session.server)
            tracker.phase = "running"

            def out(sink: progress.Sink) -> progress.Sink:
                return line.around(sink) if line is not None else sink

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_forward_signals, session, abort)
                if shown is not None:
                    nursery.start_soon(progress.watch, tracker, shown.show, 0.5 if line else 1.0)
                warn = out(writer(sys.stderr.buffer))
                session.on_warning = lambda text: warn(
                    f"topyaz-mount: warning: {printable(text)}\n".encode()
                )
                session.on_link = _say
                try:
                    result = await session.run(
                        argv,
                        cwd=cwd,
                        env=env,
                        stdout=out(writer(sys.stdout.buffer)),
                        stderr=out(writer(sys.stderr.buffer)),
                        stdin=stdin,
                        literal=literal,
                    )
                finally:
                    nursery.cancel_scope.cancel()
                    if shown is not None:
                        progress.finish(tracker, shown.show)
                    if line is not None:
                        line.close()
            return result
    return None


async def recover_kept(settings: SshSettings, root: str) -> proto.Recovered:
    """``kept --recover``: a session of its own, so every kept output goes home through
    the same verified commit path (and the same write policy) as a job's outputs."""
    async with open_session(settings, root) as session:
        return await session.recover_kept()
