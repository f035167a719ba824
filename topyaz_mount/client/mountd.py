"""A long-lived session: one ssh connection and mount, many commands, local edits pushed.

``MountServer.serve`` is ``topyaz-mount mount``: it opens the session, listens on
the control socket (see control.py), watches the root for local changes, and runs until
it is told to unmount (Ctrl-C, SIGTERM, ``topyaz-mount unmount``) or the connection is
lost. An unmount waits for running commands and for every output to be committed;
a forced one kills the commands and keeps what was not committed on the remote host,
saying how much.

Local changes reach the remote through watchfiles: each batch of changed paths, minus
the ones the session itself just made (committed outputs, the job's renames...), goes
to the agent as one ``Invalidate``, which drops its cached copies and the kernel's.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..errors import TopyazMountError, collapse
from ..policy import Policy
from ..waiting import first_of
from ..wire import proto
from . import control, persist, progress, runtime
from .session import Job, Session, open_session
from .translate import TranslationError
from .transport import SshSettings

log = logging.getLogger(__name__)

WATCH_DEBOUNCE_MS = 400  # longest a burst of changes is held back before it is sent
WATCH_STEP_MS = 30  # a quiet gap this long ends a burst


class MountServer:
    def __init__(
        self, session: Session, settings: SshSettings, name: str, idle: float | None = None
    ) -> None:
        self.session = session
        self.settings = settings
        self.name = name
        self.started = time.time()
        self.stop_requested = trio.Event()
        self.force = False
        self.finished = trio.Event()
        self.closed: proto.Closed | None = None
        self.watching = False
        self.watch_stop = trio.Event()  # set as the session ends (``run``)
        self.invalidations = 0
        self._connections = 0
        # A session an exec left behind (persist.py) ends this long after its last command.
        self.idle = idle
        self._last_active = 0.0
        # The session's transfer since it was mounted: `status` and the foreground line.
        self.tracker = progress.Tracker(session.server)
        self.tracker.phase = "mounted"

    # --- life -----------------------------------------------------------------------

    def request_stop(self, force: bool = False) -> None:
        self.force = self.force or force
        self.stop_requested.set()

    async def ready(self) -> None:
        """Wait for the agent's Welcome. If it failed, the commands sent before it (an
        exec's first, which went out behind the Hello) have said so before this raises."""
        try:
            await self.session.ready()
        except BaseException:
            with trio.move_on_after(5):
                while self._connections:
                    await trio.sleep(0.05)
            raise

    async def run(self) -> None:
        """Serve until unmounted or disconnected; the session's goodbye is said here.
        Control connections are served by ``serve_control`` and local changes watched by
        ``watch`` (both from before the Welcome)."""
        async with trio.open_nursery() as nursery:
            if self.idle is not None:
                nursery.start_soon(self._end_when_idle, self.idle)
            await self._until_stop_or_lost()
            persist.forget(self.name)  # no new exec finds it from here on
            if not self.session.lost.is_set():
                while self.session.running and not self.force and not self.session.lost.is_set():
                    await trio.sleep(0.1)
                with trio.CancelScope(shield=True):
                    self.closed = await self.session.goodbye(force=self.force)
            self.watch_stop.set()
            self.finished.set()
            # Let every control connection send its last words, then stop.
            with trio.move_on_after(5):
                while self._connections:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    async def _end_when_idle(self, idle: float) -> None:
        """Unmount once no command has run for ``idle`` seconds (ssh's ControlPersist)."""
        self._last_active = trio.current_time()
        while not self.stop_requested.is_set():
            quiet = trio.current_time() - self._last_active
            if self.session.running:
                self._last_active = trio.current_time()
            elif quiet >= idle:
                log.info("no command for %g s: ending session %s", idle, self.name)
                self.request_stop()
                return
            await trio.sleep(min(max(idle - quiet, 0.05), 1.0))

    async def _until_stop_or_lost(self) -> None:
        await first_of(self.stop_requested, self.session.lost)

    async def forward_signals(self, say: Callable[[str], None]) -> None:
        """Ctrl-C (or SIGTERM/SIGHUP) unmounts cleanly; a second one forces it."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for _ in signals:
                if not self.stop_requested.is_set():
                    running = self.session.running
                    wait = (
                        f"; waiting for {running} running command(s) (Ctrl-C again to kill them)"
                        if running
                        else ""
                    )
                    say(f"unmounting session {self.name}{wait}")
                    self.request_stop()
                else:
                    say(f"forcing the unmount of session {self.name}")
                    self.request_stop(force=True)

    # --- local changes --------------------------------------------------------------

    async def watch(self) -> None:
        """Tell the agent of local changes. Started before the Welcome: importing
        watchfiles (and anyio) took 20 ms, which held back the first command's answer."""
        import watchfiles

        stop = self.watch_stop
        server = self.session.server
        root = str(self.session.root)
        try:
            self.watching = True
            async for changes in watchfiles.awatch(
                root,
                watch_filter=None,
                debounce=WATCH_DEBOUNCE_MS,
                step=WATCH_STEP_MS,
                stop_event=stop,  # type: ignore[arg-type]
                ignore_permission_denied=True,
            ):
                paths = set()
                for _change, path in changes:
                    rel = os.path.relpath(path, root)
                    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
                        continue
                    relb = os.fsencode(rel)
                    if not server.is_echo(relb) and not server.policy.hidden(relb):
                        paths.add(relb)  # (a hidden path's name is not even told)
                server.forget_made()
                if paths:
                    self.invalidations += len(paths)
                    log.info("local changes: %s", sorted(paths)[:20])
                    await self.session.invalidate(sorted(paths))
        except Exception as e:  # noqa: BLE001 - the session goes on without the watcher
            log.warning(
                "watching %s for changes failed (%s); local edits reach the remote only "
                "when the kernel's 5 s attribute cache expires",
                root,
                e,
            )
        finally:
            self.watching = False

    # --- control connections ----------------------------------------------------------

    async def serve_control(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        self._connections += 1
        channel = control.Channel(stream)
        try:
            if not control.peer_is_us(stream):  # the socket's mode says so; make sure
                return
            msg = await channel.receive()
            if isinstance(msg, control.Exec):
                await self._exec(channel, msg)
            elif isinstance(msg, control.Query):
                await self.session.ready()
                await channel.send(control.Info(await self.info()))
            elif isinstance(msg, control.Unmount):
                await self._unmount(channel, msg.force)
        except (control.ControlError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away or spoke nonsense: nothing to answer
        finally:
            self._connections -= 1
            with trio.move_on_after(1):
                await channel.aclose()

    async def info(self, ask_agent: bool = True) -> dict[str, Any]:
        """The session's status; ``ask_agent``: with the agent's own figures (cache,
        pending outputs), a round trip more."""
        s = self.session
        info: dict[str, Any] = {
            "name": self.name,
            "host": str(self.settings.remote),
            "root": str(s.root),
            "mountpoint": s.mountpoint,
            "backend": s.backend,
            "pid": os.getpid(),
            "agent_pid": s.agent_pid,
            "started": round(self.started, 3),
            "uptime_seconds": round(time.time() - self.started, 3),
            "running": s.running,
            "watching": int(self.watching),
            "invalidated_paths": self.invalidations,
            "content_bytes_sent": s.server.stats.bytes_read,
            "content_bytes_received": s.server.stats.bytes_committed,
            "files_committed": s.server.stats.files_committed,
        }
        if self.idle is not None:  # an exec's session (persist.py): how long it waits
            info["persist_seconds"] = self.idle
        # Flat, as the control messages carry only scalars (eta, when unknown, left out).
        figures = self.tracker.snapshot().as_dict().items()
        info.update((f"progress_{k}", v) for k, v in figures if v is not None)
        if s.peer is not None:
            info["wire_bytes_sent"] = s.peer.bytes_sent
            info["wire_bytes_received"] = s.peer.bytes_received
        if ask_agent and not s.lost.is_set() and not self.finished.is_set():
            with trio.move_on_after(10):
                try:
                    st = await s.status()
                except TopyazMountError:
                    pass
                else:
                    info["cache_hits"] = st.stats.get("cache_hits", 0)
                    info["cache_misses"] = st.stats.get("cache_misses", 0)
                    info["pending_outputs"] = st.pending_outputs
                    info["pending_bytes"] = st.pending_bytes
        return info

    async def _unmount(self, channel: control.Channel, force: bool) -> None:
        running = self.session.running
        if running and not force:
            await channel.send(
                control.Note(
                    f"waiting for {running} running command(s) to finish "
                    f"(unmount --force kills them)"
                )
            )
        self.request_stop(force)
        await self.finished.wait()
        c = self.closed or proto.Closed()
        await channel.send(control.Unmounted(c.kept_files, c.kept_bytes, c.kept_dir))

    async def _exec(self, channel: control.Channel, req: control.Exec) -> None:
        if self.stop_requested.is_set() or self.session.lost.is_set():
            await channel.send(control.Failed(f"session {self.name} is ending", 255, ending=True))
            return
        job = self.session.new_job()
        job.on_warning = lambda text: None  # sent with the result, below

        async def send(msg: control.Message) -> None:
            try:
                await channel.send(msg)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client is gone; the job's outputs are still committed

        # The command's own figures, from just before it starts: those of --stats.
        tracker = progress.Tracker(self.session.server)
        tracker.phase = "running"

        reply: control.Message
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._relay_input, channel, job)
            try:
                async with trio.open_nursery() as live:
                    if req.progress > 0:
                        live.start_soon(self._figures, tracker, send, req.progress)
                    result = await self.session.run(
                        req.argv,
                        cwd=req.cwd,
                        env=req.env,
                        stdout=lambda data: send(control.Output(1, data)),
                        stderr=lambda data: send(control.Output(2, data)),
                        stdin_open=req.stdin,
                        literal=req.literal,
                        includes=req.includes,
                        tty=(req.tty[0], req.tty[1]) if req.tty and len(req.tty) == 2 else None,
                        job=job,
                    )
                    live.cancel_scope.cancel()
            except BaseException as e:  # noqa: BLE001 - becomes the client's one line
                reply = self._failure(e)
            else:
                if req.progress > 0:
                    tracker.phase = "done"
                    await send(control.Figures(tracker.snapshot().as_dict()))
                for text in result.warnings:
                    await send(control.Note(f"warning: {text}"))
                if self.force and self.stop_requested.is_set():
                    await send(control.Note(f"session {self.name} was unmounted with --force"))
                reply = control.Finished(
                    result.exit_code, result.lost, dict(result.stats), result.refused
                )
            nursery.cancel_scope.cancel()
        self._last_active = trio.current_time()
        await send(reply)

    @staticmethod
    async def _figures(tracker: progress.Tracker, send: Callable, interval: float) -> None:
        """A command's figures every ``interval`` seconds; cancelled between two sends
        (never inside one, which would cut a message short)."""
        while True:
            with trio.CancelScope(shield=True):
                await send(control.Figures(tracker.snapshot().as_dict()))
            await trio.sleep(interval)

    def _failure(self, e: BaseException) -> control.Failed:
        err = collapse(e)
        if isinstance(err, TranslationError):
            return control.Failed(str(err), 2)
        if self.force and self.stop_requested.is_set():
            return control.Failed(f"session {self.name} was unmounted with --force", 255)
        if isinstance(err, TopyazMountError):
            return control.Failed(str(err), err.exit_code)
        if isinstance(err, trio.Cancelled | KeyboardInterrupt):
            raise e
        log.error("internal error", exc_info=err)
        return control.Failed(f"internal error: {type(err).__name__}: {err}", 255)

    async def _relay_input(self, channel: control.Channel, job: Job) -> None:
        """The client's stdin, signals and window size, until it hangs up."""
        while True:
            try:
                msg = await channel.receive()
            except control.ControlError:
                msg = None
            if msg is None:  # the client is gone: as sshd does, hang up on the job
                await job.signal(signal.SIGHUP)
                return
            if isinstance(msg, control.StdinData):
                await job.send_stdin(msg.data)
            elif isinstance(msg, control.StdinClose):
                await job.close_stdin()
            elif isinstance(msg, control.SignalJob):
                await job.signal(msg.signum)
            elif isinstance(msg, control.Resize):
                await job.resize(msg.rows, msg.cols)


async def serve(
    settings: SshSettings,
    root: str,
    name: str,
    *,
    on_ready: Callable[[dict[str, Any]], None],
    on_listening: Callable[[], None] = lambda: None,
    say: Callable[[str], None],
    handle_signals: bool = True,
    policy: Policy | None = None,
    includes: Sequence[str] = (),
    line: progress.TerminalLine | None = None,
    key: str | None = None,
    idle: float | None = None,
    spawned: subprocess.Popen | None = None,
    first_command: tuple[Sequence[str], str] | None = None,
) -> tuple[MountServer, bool]:
    """Run session ``name`` until it is unmounted; returns it and whether it was lost.
    ``includes``: local paths every command's manifest adds (the profile's); ``line``:
    the session's transfer shown live there (a foreground mount on a terminal);
    ``key``: its reuse key, published for one-shot execs (persist.py); ``idle``: end
    after that long without a command; ``spawned``, ``first_command``: as
    ``open_session``'s (a session an exec starts for its own command), and then the
    control socket takes commands from before the agent's Welcome, so that command
    goes out behind the Hello (``on_listening``: the socket and key are up)."""
    path = runtime.socket_path(name)
    if await control.alive(name):
        if spawned is not None:
            spawned.kill()
        raise control.ControlError(
            f"a session named {name} is running already (pick another with --name)"
        )
    try:
        path.unlink()  # a stale socket of a session that died
    except FileNotFoundError:
        pass
    async with open_session(
        settings,
        root,
        watch=True,
        policy=policy,
        includes=includes,
        spawned=spawned,
        first_command=first_command,
        pipelined=first_command is not None,
    ) as session:
        listener = await control.listen(path)
        try:
            server = MountServer(session, settings, name, idle)
            if key is not None:
                persist.write_key(name, key)
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(server.forward_signals, say)
                nursery.start_soon(server.serve_control, listener)
                nursery.start_soon(server.watch)
                on_listening()
                await server.ready()
                on_ready(await server.info(ask_agent=False))  # ready a round trip sooner
                if line is not None:
                    nursery.start_soon(progress.watch, server.tracker, line.show, 0.5)
                try:
                    await server.run()
                finally:
                    nursery.cancel_scope.cancel()
                    if line is not None:
                        line.close()
        finally:
            persist.forget(name)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            await listener.aclose()
        return server, session.lost.is_set()
