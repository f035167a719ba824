"""The client session: ssh up, agent greeted, files served, one command run, all closed.

``open_session`` is the whole life of a connection as one ``async with``: it starts
ssh, reads past anything a login shell prints until the agent's magic, greets the
agent (which mounts the root), serves the agent's file requests from the jail, and
on the way out says goodbye (the agent unmounts and removes its session dir), closes
the pipe and waits for ssh, whatever happened in between.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import proto
from .errors import (
    AgentUnavailable,
    ConnectionFailed,
    JobTimeout,
    RemoteCommandFailed,
    UsageError,
)
from .fileserver import FileServer
from .hashindex import MANIFEST_HASH_BUDGET
from .inputs import input_files
from .rpc import ConnectionLost, Peer, RemoteError
from .translate import PathMap, translate_argv, translate_cwd, translate_env
from .transport import SshProcess, SshSettings, explain_startup_failure, start_ssh

log = logging.getLogger(__name__)

Sink = Callable[[bytes], None]


@dataclass
class RunResult:
    exit_code: int
    lost: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int | float] = field(default_factory=dict)


class Session:
    def __init__(
        self, settings: SshSettings, server: FileServer, ssh: SshProcess, nursery: trio.Nursery
    ) -> None:
        self.settings = settings
        self.server = server
        self.ssh = ssh
        self.nursery = nursery
        self.session_id = secrets.token_hex(8)
        self.pathmap: PathMap | None = None
        self.peer: Peer | None = None
        self.agent_pid = 0
        self._sinks: dict[int, Sink] = {}
        self._exited: proto.Exited | None = None
        self._exit_event = trio.Event()
        self._lost = trio.Event()
        self.warnings: list[str] = []
        self.on_warning: Callable[[str], None] = lambda text: log.warning("%s", text)

    @property
    def lost(self) -> trio.Event:
        """Set when the connection to the agent has ended."""
        return self._lost

    @property
    def root(self) -> Path:
        return self.server.jail.root

    @property
    def mountpoint(self) -> str:
        assert self.pathmap is not None
        return self.pathmap.remote_root

    # --- connection -----------------------------------------------------------------

    async def _handshake(self, timeout: float) -> None:
        buf = bytearray()
        with trio.move_on_after(timeout) as scope:
            while True:
                try:
                    data = await self.ssh.stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    raise await self._startup_failure()
                buf += data
                found, skipped = proto.strip_preamble(buf)
                if skipped.strip():
                    log.info("remote login printed: %r", skipped[:200])
                if found:
                    break
        if scope.cancelled_caught:
            raise ConnectionFailed(f"no answer from {self.settings.remote} within {timeout:.0f} s")
        self.peer = Peer(self.ssh.stream, self.server.handle, self._on_notice, preamble=bytes(buf))
        self.nursery.start_soon(self._run_peer)
        self.server.background = self.nursery
        self.server.notify = self.peer.notify
        hello = proto.Hello(proto.PROTOCOL_VERSION, self.session_id, ["exec"])
        try:
            with trio.fail_after(timeout):
                welcome = await self.peer.call(hello)
        except RemoteError as e:
            raise AgentUnavailable(f"{self.settings.remote}: {e.strerror}") from None
        except (ConnectionLost, trio.TooSlowError):
            raise await self._startup_failure() from None
        self.pathmap = PathMap(str(self.root), welcome.mountpoint)
        self.agent_pid = welcome.agent_pid
        log.info("session %s mounted at %s", self.session_id, welcome.mountpoint)

    async def _startup_failure(self) -> Exception:
        with trio.move_on_after(5):
            await self.ssh.process.wait()
        await trio.sleep(0.05)  # let the stderr pump take the last lines
        return explain_startup_failure(self.settings, list(self.ssh.stderr_tail))

    async def _run_peer(self) -> None:
        assert self.peer is not None
        try:
            await self.peer.run()
        except proto.ProtocolError:
            pass  # logged by the peer; the session reports the lost connection
        finally:
            self._lost.set()

    async def _on_notice(self, msg: object) -> None:
        if isinstance(msg, proto.CommitChunk):
            self.server.handle_chunk(msg)
        elif isinstance(msg, proto.Output):
            sink = self._sinks.get(msg.fd)
            if sink is not None:
                sink(msg.data)
        elif isinstance(msg, proto.Exited):
            self._exited = msg
            self._exit_event.set()
        elif isinstance(msg, proto.Log):
            self.warnings.append(msg.text)
            self.on_warning(msg.text)

    async def _goodbye(self) -> None:
        if self.peer is None or self.peer.closed:
            return
        with trio.move_on_after(120):
            try:
                await self.peer.call(proto.Bye())
            except (ConnectionLost, RemoteError) as e:
                log.info("goodbye failed: %s", e)

    # --- the command ----------------------------------------------------------------

    def translate(
        self, argv: Sequence[str], cwd: str, env: Mapping[str, str], literal: Sequence[str] = ()
    ) -> tuple[list[str], str, dict[str, str]]:
        assert self.pathmap is not None
        return (
            translate_argv(argv, self.pathmap, cwd, literal=literal),
            translate_cwd(cwd, self.pathmap),
            translate_env(env, self.pathmap, cwd),
        )

    async def signal(self, signum: int) -> None:
        if self.peer is not None and not self.peer.closed:
            try:
                await self.peer.notify(proto.Signal(signum), proto.PRIO_URGENT)
            except ConnectionLost:
                pass

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout: Sink,
        stderr: Sink,
        stdin: bytes | trio.abc.ReceiveStream | None = None,
        timeout: float | None = None,
        literal: Sequence[str] = (),
    ) -> RunResult:
        """Run one command through the mount; returns after its outputs are committed."""
        assert self.peer is not None
        remote_argv, remote_cwd, remote_env = self.translate(
            argv, os.path.abspath(cwd or str(self.root)), env or {}, literal
        )
        self._sinks = {1: stdout, 2: stderr}
        self._exited = None
        self._exit_event = trio.Event()
        self.warnings = []
        sent_before = self.server.stats.bytes_read
        committed_before = self.server.stats.bytes_committed
        files_before = self.server.stats.files_committed
        wire_before = (self.peer.bytes_sent, self.peer.bytes_received)
        hashed_before = self.server.index.hashed_bytes
        started_at = trio.current_time()
        await self._send_manifest(argv, os.path.abspath(cwd or str(self.root)))
        run = proto.Run(remote_argv, remote_cwd, remote_env, stdin is not None)
        try:
            await self.peer.call(run)
        except RemoteError as e:
            failure = RemoteCommandFailed(f"on {self.settings.remote}: {e.strerror}")
            if e.errno == errno.ENOENT:
                failure.exit_code = 127
            elif e.errno == errno.EACCES:
                failure.exit_code = 126
            raise failure from None
        except ConnectionLost:
            raise self._lost_error() from None
        if stdin is not None:
            self.nursery.start_soon(self._feed_stdin, stdin)
        timed_out = False
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            await self._wait_exit()
        if scope.cancelled_caught:
            timed_out = True
            await self.signal(9)
            with trio.move_on_after(30):
                await self._wait_exit()
        if self._exited is None:
            raise self._lost_error()
        if timed_out:
            raise JobTimeout(f"the command ran past its {timeout:g} s limit and was killed")
        stats: dict[str, int | float] = dict(self._exited.stats)
        stats.update(
            content_bytes_sent=self.server.stats.bytes_read - sent_before,
            content_bytes_received=self.server.stats.bytes_committed - committed_before,
            files_committed=self.server.stats.files_committed - files_before,
            wire_bytes_sent=self.peer.bytes_sent - wire_before[0],
            wire_bytes_received=self.peer.bytes_received - wire_before[1],
            hashed_bytes=self.server.index.hashed_bytes - hashed_before,
            wall_seconds=round(trio.current_time() - started_at, 3),
        )
        stats.pop("content_bytes_committed", None)
        return RunResult(self._exited.code, list(self._exited.lost), list(self.warnings), stats)

    async def _send_manifest(self, argv: Sequence[str], cwd: str) -> None:
        """Tell the agent which inputs are coming so it can fetch what it lacks now."""
        assert self.peer is not None and self.pathmap is not None
        local = PathMap(str(self.root), self.pathmap.remote_root)
        paths = input_files(argv, local, cwd)
        if not paths:
            return
        entries = await trio.to_thread.run_sync(self.server.manifest, paths, MANIFEST_HASH_BUDGET)
        try:
            missing = await self.peer.call(proto.Manifest(entries))
        except RemoteError as e:
            log.info("manifest refused: %s", e)
            return
        except ConnectionLost:
            raise self._lost_error() from None
        log.info("manifest: %d inputs, %d to fetch", len(entries), len(missing.indices))

    async def _wait_exit(self) -> None:
        async with trio.open_nursery() as nursery:

            async def watch(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch, self._exit_event)
            nursery.start_soon(watch, self._lost)

    def _lost_error(self) -> ConnectionFailed:
        tail = [line for line in self.ssh.stderr_tail if line.strip()]
        why = f" ({tail[-1]})" if tail else ""
        return ConnectionFailed(
            f"connection to {self.settings.remote} lost during the job{why}; outputs not "
            f"yet committed are kept on the remote under ~/.cache/topyaz-mount/kept/"
            f"{self.session_id}"
        )

    async def _feed_stdin(self, stdin: bytes | trio.abc.ReceiveStream) -> None:
        assert self.peer is not None
        try:
            if isinstance(stdin, bytes):
                for i in range(0, len(stdin), proto.CHUNK_SIZE):
                    await self.peer.notify(proto.StdinData(stdin[i : i + proto.CHUNK_SIZE]))
            else:
                while data := await stdin.receive_some(1 << 16):
                    await self.peer.notify(proto.StdinData(bytes(data)))
            await self.peer.notify(proto.StdinClose())
        except ConnectionLost:
            pass


@asynccontextmanager
async def open_session(
    settings: SshSettings, root: str | Path, *, connect_timeout: float = 60.0
) -> AsyncIterator[Session]:
    """Connect, mount ``root`` on the remote, and yield the session; always cleans up."""
    root_path = Path(os.path.realpath(root))
    if not root_path.is_dir():
        raise UsageError(f"--root {root}: not a directory")
    try:
        server = FileServer(root_path)
    except OSError as e:
        raise UsageError(f"--root {root}: {e.strerror}") from None
    try:
        ssh = await start_ssh(settings)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ssh.pump_stderr)
                session = Session(settings, server, ssh, nursery)
                try:
                    await session._handshake(connect_timeout)
                    yield session
                    with trio.CancelScope(shield=True):
                        await session._goodbye()
                finally:
                    with trio.CancelScope(shield=True):
                        await ssh.stop()
                    nursery.cancel_scope.cancel()
        finally:
            if ssh.process.returncode is None:
                ssh.process.kill()
    finally:
        server.close()
