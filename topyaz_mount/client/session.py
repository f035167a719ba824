"""The client session: ssh up, agent greeted, files served, commands run, all closed.

``open_session`` is the whole life of a connection as one ``async with``: it starts
ssh, reads past anything a login shell prints until the agent's magic, greets the
agent (which mounts the root), serves the agent's file requests from the jail, and
on the way out says goodbye (the agent unmounts and removes its session dir), closes
the pipe and waits for ssh, whatever happened in between.

Commands run as jobs: each ``run`` gets a job id that every message about it carries,
so a long-lived session can run several at once.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import logging
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import (
    AgentUnavailable,
    ConnectionFailed,
    JobTimeout,
    RemoteCommandFailed,
    UsageError,
    exit_status,
)
from ..policy import MAX_REFUSALS_KEPT, Policy, PolicyOptions, Refusal, summarize
from ..waiting import first_of
from ..wire import liveness, pacing, proto
from ..wire.rpc import ConnectionLost, Peer, PeerStalled, RemoteError
from .fileserver import FileServer
from .hashindex import MANIFEST_HASH_BUDGET
from .inputs import input_files
from .jail import checked_root
from .translate import PathMap, translate_argv, translate_cwd, translate_env
from .transport import SshProcess, SshSettings, attach_ssh, explain_startup_failure, start_ssh

if TYPE_CHECKING:
    from .detached import Record as DetachedRecord
    from .detached import Writer
    from .reconnect import Reconnector

log = logging.getLogger(__name__)

# What ssh prints when the connection itself failed (as opposed to the agent dying).
_SSH_LOST = re.compile(
    r"closed by remote host|Broken pipe|not responding|Connection reset|Connection timed out"
    r"|packet_write|client_loop|Connection closed"
)

# Where a job's stdout or stderr bytes go; may be async (a control connection).
Sink = Callable[[bytes], None | Awaitable[None]]


@dataclass
class RunResult:
    exit_code: int
    lost: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int | float | str] = field(default_factory=dict)
    # One line per path the write policy refused the job (what was tried, and why).
    refused: list[str] = field(default_factory=list)


class Job:
    """One command of a session, as the caller holds it: signals, stdin, window size."""

    def __init__(self, session: Session, job_id: int) -> None:
        self.session = session
        self.id = job_id
        self.sinks: dict[int, Sink] = {}
        self.includes: list[str] = []  # local paths its manifest adds (--include)
        self.exited: proto.Exited | None = None
        self.started = trio.Event()  # the agent knows the job: messages may go out
        self.done = trio.Event()
        self.warnings: list[str] = []
        self.on_warning: Callable[[str], None] | None = None

    async def _notify(self, msg: object, prio: int = proto.PRIO_NORMAL) -> None:
        await self.started.wait()
        peer = self.session.peer
        if peer is not None and not peer.closed and not self.done.is_set():
            try:
                await peer.notify(msg, prio)
            except ConnectionLost:
                pass

    async def signal(self, signum: int) -> None:
        await self._notify(proto.Signal(self.id, signum), proto.PRIO_URGENT)

    async def resize(self, rows: int, cols: int) -> None:
        await self._notify(proto.Resize(self.id, rows, cols), proto.PRIO_URGENT)

    async def send_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), proto.CHUNK_SIZE):
            await self._notify(proto.StdinData(self.id, data[i : i + proto.CHUNK_SIZE]))

    async def close_stdin(self) -> None:
        await self._notify(proto.StdinClose(self.id))


class Session:
    def __init__(
        self, settings: SshSettings, server: FileServer, ssh: SshProcess, nursery: trio.Nursery
    ) -> None:
        self.settings = settings
        self.server = server
        self.ssh = ssh
        self.nursery = nursery
        self.session_id = secrets.token_hex(8)
        self.secret = secrets.token_hex(16)  # a detachable session's: only we know it
        self.reconnector: Reconnector | None = None
        # A detachable session's record, for `attach` from a new process (detached.py).
        self.record: Writer | None = None
        # Output of a job this process did not start (a session taken over: attach.py).
        self.adopt: Callable[[int], Job | None] | None = None
        # One line per outage of a detachable session ("link lost at …, reconnected …").
        self.on_link: Callable[[str], None] = lambda text: log.warning("%s", text)
        self.pathmap: PathMap | None = None
        self._welcomed = trio.Event()  # the agent answered Hello (``ready``)
        self._welcome_error: Exception | None = None
        self.peer: Peer | None = None
        self.agent_pid = 0
        self._jobs: dict[int, Job] = {}
        self._job_ids = itertools.count(1)
        self._lost = trio.Event()
        self.failure: proto.ProtocolError | None = None  # why the agent was cut off
        self.closed: proto.Closed | None = None
        # The process ends right after this session's one command (a one-shot exec):
        # its Run asks the agent to close after it (``Run.close_after``: no Bye round
        # trip), and once the agent has said Closed, ssh is told the end and left to
        # finish on its own (waiting for it was 50 ms on a 20 ms link).
        self.exit_after = False
        self._agent_closes = False  # that command's Exited came: Closed follows unasked
        self._closed_notice = trio.Event()
        self.silent_for: float | None = None  # the agent said nothing for this long
        self.watch = False  # the caller pushes local changes (long-lived sessions)
        self.backend = ""  # how the agent shows the job the root (from Welcome)
        # Local paths every command's manifest adds (``--include``): inputs its
        # arguments do not name, which the stage backend must copy over all the same.
        self.includes: list[str] = []
        # The next command's manifest, computed while the connection is made.
        self._premanifest: tuple[tuple[tuple[str, ...], str], trio.Event, list] | None = None
        self._hashed_base: int | None = None  # the index's counter before that hashing
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

    async def _handshake(self, timeout: float, take_over: bool = False, wait: bool = True) -> None:
        """``take_over``: attach to a running detachable session (attach.py asks for
        the rest) instead of starting one. ``wait`` False: return once Hello is on its
        way; the first command may follow it at once (``ready`` waits for Welcome)."""
        detachable = self.settings.grace > 0 or take_over
        hello = self._hello(keepalive=not detachable)
        ahead = False
        if detachable:
            await self._attach_detachable(timeout, take_over)
        else:
            # Pipelined: the Hello waits in ssh's pipe while it connects and the agent
            # starts, and the agent reads it once it is up: a round trip fewer.
            try:
                await self.ssh.stream.send_all(
                    proto.encode(proto.Call(1, proto.PRIO_NORMAL, hello))
                )
                ahead = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # ssh is gone already: reading its answer says why
            await self._read_magic(timeout, calls_sent=int(ahead))
        self.nursery.start_soon(self._run_peer)
        assert self.peer is not None
        self.server.background = self.nursery
        self.server.notify = self.peer.notify
        self.peer.pacer = pacing.bucket(self.settings.bwlimit[0])
        if take_over:
            self._welcomed.set()
            return
        welcome = self.peer.reply(1) if ahead else self.peer.call(hello)
        if wait:
            await self._welcome(welcome, timeout)
            await self.ready()
        else:
            self.nursery.start_soon(self._welcome, welcome, timeout)

    async def _welcome(self, reply: Awaitable[proto.Welcome], timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                welcome = await reply
        except RemoteError as e:
            self._welcome_error = AgentUnavailable(f"{self.settings.remote}: {e.strerror}")
        except (ConnectionLost, trio.TooSlowError):
            self._welcome_error = await self._startup_failure()
        else:
            self._on_welcome(welcome)
        finally:
            self._welcomed.set()

    async def ready(self) -> None:
        """Wait for the agent's Welcome; raise why it did not come."""
        await self._welcomed.wait()
        if self._welcome_error is not None:
            raise self._welcome_error

    def _on_welcome(self, welcome: proto.Welcome) -> None:
        assert self.peer is not None
        self.pathmap = PathMap(str(self.root), welcome.mountpoint)
        self.agent_pid = welcome.agent_pid
        self.backend = welcome.backend or "fuse"
        if welcome.backend_note:
            log.info("%s", welcome.backend_note)
        if liveness.CAPABILITY in welcome.capabilities and self.reconnector is None:
            self.nursery.start_soon(
                liveness.watch, self.peer, self.settings.keepalive, self._agent_silent
            )
        log.info(
            "session %s: the root is at %s (%s)", self.session_id, welcome.mountpoint, self.backend
        )

    def _hello(self, keepalive: bool) -> proto.Hello:
        # A detachable session's liveness is its stream's (resume.py), not the Peer's.
        capabilities = ["exec", "jobs"] + [liveness.CAPABILITY] * keepalive
        capabilities += ["watch"] if self.watch else []
        return proto.Hello(
            proto.PROTOCOL_VERSION,
            self.session_id,
            capabilities,
            proto.PolicyRules(*self.server.policy.rules()),
            str(self.root),
            bwlimit=self.settings.bwlimit[1],
        )

    async def _read_magic(self, timeout: float, calls_sent: int = 0) -> None:
        """Read past what a login shell prints, up to the agent's magic."""
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
        self.peer = Peer(
            self.ssh.stream,
            self.server.handle,
            self._on_notice,
            preamble=bytes(buf),
            calls_sent=calls_sent,
        )

    async def _attach_detachable(self, timeout: float, fresh: bool = False) -> None:
        """A session that outlives its connection (``settings.grace``): the Peer runs on
        a stream that survives ssh (reconnect.py), started by the attach line.
        ``fresh``: a session this process takes over (attach.py)."""
        from .reconnect import Reconnector, SessionUnreachable

        self.reconnector = Reconnector(self, lambda text: self.on_link(text))
        self.reconnector.fresh = fresh
        try:
            stream = await self.reconnector.start(timeout)
        except SessionUnreachable:
            raise await self._startup_failure() from None
        except trio.TooSlowError:
            raise ConnectionFailed(
                f"no answer from {self.settings.remote} within {timeout:.0f} s"
            ) from None
        self.peer = Peer(stream, self.server.handle, self._on_notice)

    async def _agent_silent(self, seconds: float) -> None:
        """No byte from the agent for ``seconds``: the link is dead or stalled; ending
        ssh ends the session (the agent notices the same silence and tears down)."""
        self.silent_for = seconds
        self.ssh.kill()

    async def _startup_failure(self) -> Exception:
        from .reconnect import AttachRefused

        failure = self.reconnector.failure if self.reconnector is not None else None
        if isinstance(failure, AttachRefused):
            return failure
        with trio.move_on_after(5):
            await self.ssh.wait()
        await trio.sleep(0.05)  # let the stderr pump take the last lines
        return explain_startup_failure(self.settings, list(self.ssh.stderr_tail))

    async def _run_peer(self) -> None:
        assert self.peer is not None
        try:
            await self.peer.run()
        except proto.ProtocolError as e:
            self.failure = e  # the session reports the lost connection, with this reason
        finally:
            self._lost.set()

    async def _on_notice(self, msg: object) -> None:
        if isinstance(msg, proto.Closing):
            self.closed = msg.closed
            self._closed_notice.set()
        elif isinstance(msg, proto.CommitChunk):
            await self.server.receive_chunk(msg)
        elif isinstance(msg, proto.Output):
            job = self._job(msg.job)
            sink = job.sinks.get(msg.fd) if job is not None else None
            if sink is not None:
                result = sink(msg.data)
                if inspect.isawaitable(result):
                    await result
                if self.record is not None:
                    self.record.wrote(msg.job, msg.fd, len(msg.data))
        elif isinstance(msg, proto.Exited):
            job = self._job(msg.job)
            if job is not None:
                job.exited = msg
                job.done.set()
        elif isinstance(msg, proto.Log):
            self._warn(self._job(msg.job), msg.text)

    def _job(self, job_id: int) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None and self.adopt is not None:
            job = self.adopt(job_id)
            if job is not None:
                self._jobs[job_id] = job
        return job

    def _warn(self, job: Job | None, text: str) -> None:
        """A line for the user about ``job`` (its result lists it too)."""
        if job is not None:
            job.warnings.append(text)
        (job.on_warning if job is not None and job.on_warning else self.on_warning)(text)

    async def goodbye(self, force: bool = False) -> proto.Closed | None:
        """End the remote session (idempotent); what it could not commit is named."""
        if self.closed is not None or self.peer is None or self.peer.closed:
            return self.closed
        with trio.move_on_after(120):
            if self._agent_closes:
                await first_of(self._closed_notice, self._lost)
                return self.closed
            try:
                self.closed = await self.peer.call(proto.Bye(force))
            except (ConnectionLost, RemoteError) as e:
                log.info("goodbye failed: %s", e)
        return self.closed

    async def status(self) -> proto.StatusReply:
        assert self.peer is not None
        try:
            return await self.peer.call(proto.Status(), proto.PRIO_URGENT)
        except ConnectionLost:
            raise await self._loss_error("") from None

    async def recover_kept(self) -> proto.Recovered:
        """Commit home what the remote kept of this root from failed sessions."""
        assert self.peer is not None
        try:
            return await self.peer.call(proto.RecoverKept())
        except ConnectionLost:
            raise await self._loss_error("") from None
        except RemoteError as e:
            raise AgentUnavailable(f"{self.settings.remote}: {e.strerror}") from None

    async def invalidate(self, paths: list[bytes]) -> None:
        """Tell the agent these root-relative paths changed here."""
        if self.peer is not None and not self.peer.closed:
            for i in range(0, len(paths), 1000):
                try:
                    await self.peer.notify(proto.Invalidate(paths[i : i + 1000]), proto.PRIO_URGENT)
                except ConnectionLost:
                    return

    @property
    def running(self) -> int:
        """Jobs started and not yet reported finished."""
        return len(self._jobs)

    # --- the command ----------------------------------------------------------------

    def _pathmap(self) -> PathMap:
        return self.pathmap or PathMap(str(self.root), proto.ROOT_MARKER)

    def translate(
        self, argv: Sequence[str], cwd: str, env: Mapping[str, str], literal: Sequence[str] = ()
    ) -> tuple[list[str], str, dict[str, str]]:
        """The command as the remote runs it. Before the Welcome has named the
        mountpoint, paths go out under ``proto.ROOT_MARKER``, which the agent swaps for
        it (no argument of a real command can hold its NUL)."""
        pathmap = self._pathmap()
        return (
            translate_argv(argv, pathmap, cwd, literal=literal),
            translate_cwd(cwd, pathmap),
            translate_env(env, pathmap, cwd),
        )

    async def signal(self, signum: int) -> None:
        """Send a signal to every running job (the one-shot exec has one)."""
        for job in list(self._jobs.values()):
            await job.signal(signum)

    def new_job(self) -> Job:
        return Job(self, next(self._job_ids))

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout: Sink,
        stderr: Sink,
        stdin: bytes | trio.abc.ReceiveStream | None = None,
        stdin_open: bool = False,
        timeout: float | None = None,
        literal: Sequence[str] = (),
        tty: tuple[int, int] | None = None,
        job: Job | None = None,
        includes: Sequence[str] = (),
    ) -> RunResult:
        """Run one command through the mount; returns after its outputs are committed.

        ``stdin_open``: the caller feeds stdin itself through ``job.send_stdin``.
        ``tty``: run on a pseudo-terminal of (rows, cols), as ``ssh -t`` does.
        ``includes``: local paths this command reads that its arguments do not name.
        """
        assert self.peer is not None
        remote_argv, remote_cwd, remote_env = self.translate(
            argv, os.path.abspath(cwd or str(self.root)), env or {}, literal
        )
        job = job or self.new_job()
        job.sinks = {1: stdout, 2: stderr}
        if self.record is not None:
            self.record.ran(list(argv))
        job.includes = [os.path.abspath(p) for p in includes]
        self._jobs[job.id] = job
        try:
            return await self._run_job(
                job,
                remote_argv,
                remote_cwd,
                remote_env,
                argv,
                cwd,
                stdin,
                stdin_open,
                timeout,
                tty,
            )
        finally:
            self._jobs.pop(job.id, None)
            job.done.set()
            job.started.set()

    async def _run_job(
        self,
        job: Job,
        remote_argv: list[str],
        remote_cwd: str,
        remote_env: dict[str, str],
        argv: Sequence[str],
        cwd: str | None,
        stdin: bytes | trio.abc.ReceiveStream | None,
        stdin_open: bool,
        timeout: float | None,
        tty: tuple[int, int] | None,
    ) -> RunResult:
        assert self.peer is not None
        sent_before = self.server.stats.bytes_read
        committed_before = self.server.stats.bytes_committed
        files_before = self.server.stats.files_committed
        inlined_before = self.server.stats.files_inlined
        wire_before = (self.peer.bytes_sent, self.peer.bytes_received)
        hashed_before = self.server.index.hashed_bytes
        refusals_before = self.server.refusals.count
        if self._hashed_base is not None:  # the manifest was hashed ahead: count it here
            hashed_before, self._hashed_base = self._hashed_base, None
        started_at = trio.current_time()
        manifest = None
        if tty is None:
            manifest = await self._send_manifest(job, argv, os.path.abspath(cwd or str(self.root)))
        want_stdin = stdin is not None or stdin_open
        run = proto.Run(
            job.id,
            remote_argv,
            remote_cwd,
            remote_env,
            want_stdin,
            list(tty) if tty else None,
            after_manifest=manifest is not None,
            close_after=self.exit_after,
            dirs=self._dirs_to(cwd),
        )
        try:
            await self.peer.call(run)
            await self.ready()
        except RemoteError as e:
            await self.ready()  # a failed Hello says why, not the Run it took along
            failure = RemoteCommandFailed(f"on {self.settings.remote}: {e.strerror}")
            if e.errno == errno.ENOENT:
                failure.exit_code = 127
            elif e.errno == errno.EACCES:
                failure.exit_code = 126
            raise failure from None
        except ConnectionLost:
            await self.ready()
            raise await self._loss_error() from None
        job.started.set()
        if stdin is not None:
            self.nursery.start_soon(self._feed_stdin, job, stdin)
        timed_out = False
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            await self._wait_exit(job)
        if scope.cancelled_caught:
            timed_out = True
            await job.signal(9)
            with trio.move_on_after(30):
                await self._wait_exit(job)
        exited = job.exited
        if exited is None:
            raise await self._loss_error()
        if manifest is not None:
            await manifest.wait()  # its answer came before the job started: counted now
        self._agent_closes = run.close_after
        if timed_out:
            raise JobTimeout(f"the command ran past its {timeout:g} s limit and was killed")
        stats: dict[str, int | float | str] = dict(exited.stats)
        stats.update(
            content_bytes_sent=self.server.stats.bytes_read - sent_before,
            content_bytes_received=self.server.stats.bytes_committed - committed_before,
            files_committed=self.server.stats.files_committed - files_before,
            files_inlined=self.server.stats.files_inlined - inlined_before,
            wire_bytes_sent=self.peer.bytes_sent - wire_before[0],
            wire_bytes_received=self.peer.bytes_received - wire_before[1],
            hashed_bytes=self.server.index.hashed_bytes - hashed_before,
            wall_seconds=round(trio.current_time() - started_at, 3),
            backend=self.backend,
        )
        stats.pop("content_bytes_committed", None)
        # The client's own refusals during the job, and those the agent made at open.
        refusals = self.server.refusals.since(refusals_before) + [
            Refusal(r.path, r.op, r.why) for r in exited.refused[:MAX_REFUSALS_KEPT]
        ]
        code, note = exit_status(exited.code)
        if note is not None:
            self._warn(job, note)
        return RunResult(code, list(exited.lost), list(job.warnings), stats, summarize(refusals))

    def prepare_manifest(self, argv: Sequence[str], cwd: str) -> None:
        """Hash the inputs of the command about to run while ssh connects and the agent
        starts: on a cold run that hashing would otherwise hold back the command."""
        done = trio.Event()
        slot: list = []

        async def compute() -> None:
            try:
                slot.append(await self._manifest_entries(argv, cwd))
            except Exception as e:  # noqa: BLE001 - run() computes it again and reports
                log.debug("manifest ahead of the command failed: %s", e)
            finally:
                done.set()

        self._premanifest = ((tuple(argv), cwd), done, slot)
        self._hashed_base = self.server.index.hashed_bytes
        self.nursery.start_soon(compute)

    async def _manifest_entries(
        self, argv: Sequence[str], cwd: str, includes: Sequence[str] = ()
    ) -> list[proto.ManifestEntry]:
        # Only which paths are inputs matters here; the remote side of the map does not.
        named = [*argv, *self.includes, *includes]
        paths = input_files(named, PathMap(str(self.root), "/"), cwd)
        if not paths:
            return []
        return await trio.to_thread.run_sync(self.server.manifest, paths, MANIFEST_HASH_BUDGET)

    def _dirs_to(self, cwd: str | None) -> list[proto.KnownDir]:
        rel = self._pathmap().relative(os.path.abspath(cwd or str(self.root)))
        return [] if rel is None else self.server.directory_attrs(os.fsencode(rel))

    async def _send_manifest(self, job: Job, argv: Sequence[str], cwd: str) -> trio.Event | None:
        """Tell the agent which inputs are coming so it can fetch what it lacks now.
        The Run follows without waiting for the answer (the agent starts the job after
        the manifest: ``Run.after_manifest``); the event is set once it is in."""
        assert self.peer is not None
        job_id = job.id
        pre, self._premanifest = self._premanifest, None
        if pre is not None and pre[0] == (tuple(argv), cwd) and not job.includes:
            await pre[1].wait()
            entries = pre[2][0] if pre[2] else await self._manifest_entries(argv, cwd)
        else:
            entries = await self._manifest_entries(argv, cwd, job.includes)
        if not entries:
            return None
        answered = trio.Event()
        self.nursery.start_soon(self._manifest_call, proto.Manifest(job_id, entries), answered)
        return answered

    async def _manifest_call(self, manifest: proto.Manifest, answered: trio.Event) -> None:
        assert self.peer is not None
        entries = manifest.entries
        try:
            try:
                missing = await self.peer.call(manifest)
            except RemoteError as e:
                log.info("manifest refused: %s", e)
                return
            except ConnectionLost:
                return  # the Run says so
            log.info("manifest: %d inputs, %d to fetch", len(entries), len(missing.indices))
            fetched = {i for i in missing.indices if 0 <= i < len(entries)}
            self.server.stats.manifest_bytes += sum(e.size for e in entries)
            self.server.stats.manifest_cached_bytes += sum(
                e.size for i, e in enumerate(entries) if i not in fetched
            )
        finally:
            answered.set()

    async def _wait_exit(self, job: Job) -> None:
        await first_of(job.done, self._lost)

    async def _loss_error(self, during: str = " during the job") -> ConnectionFailed:
        """The error for a lost connection, once ssh has said how it ended."""
        with trio.move_on_after(2):
            await self.ssh.wait()
        return ConnectionFailed(self.loss_message(during))

    def loss_message(self, during: str = " during the job") -> str:
        """What was lost, and what is on the remote now, as exactly as we know it.

        A killed agent takes the outputs it had not committed with it (spool files are
        unlinked while open); a dead or stalled link leaves the agent running, and it
        keeps them under ``kept/`` as it tears down."""
        host = self.settings.remote
        tail = [line for line in self.ssh.stderr_tail if line.strip()]
        in_flight = sorted(os.fsdecode(p) for p in self.server.commits_in_flight())
        dropped = f": {', '.join(in_flight)}" if in_flight else ""
        if (
            self.silent_for is None
            and self.failure is None  # we ended it ourselves (a stalled or broken agent)
            and self.ssh.returncode == 255
            and not any(_SSH_LOST.search(line) for line in tail)
        ):
            return (
                f"the agent on {host} died{during} (killed); outputs not yet committed "
                f"were lost on the remote with it, nothing is kept there; "
                f"{len(in_flight)} output(s) were on their way{dropped}"
            )
        if isinstance(self.failure, PeerStalled):
            why = " (the agent stopped reading its replies; giving up)"
        elif self.failure is not None:
            why = f" (the agent broke the protocol: {self.failure})"
        elif self.silent_for is not None:
            why = f" (no answer for {self.silent_for:.0f} s: the link is dead or stalled)"
        else:
            why = f" ({tail[-1]})" if tail else ""
        return (
            f"connection to {host} lost{during}{why}; {len(in_flight)} output(s) were on "
            f"their way{dropped}; the agent keeps outputs not yet committed on the remote "
            f"(see `topyaz-mount kept --remote {host}`, session {self.session_id})"
        )

    async def _feed_stdin(self, job: Job, stdin: bytes | trio.abc.ReceiveStream) -> None:
        if isinstance(stdin, bytes):
            await job.send_stdin(stdin)
        else:
            while data := await stdin.receive_some(1 << 16):
                await job.send_stdin(bytes(data))
        await job.close_stdin()


@asynccontextmanager
async def open_session(
    settings: SshSettings,
    root: str | Path,
    *,
    connect_timeout: float = 60.0,
    watch: bool = False,
    spawned: subprocess.Popen | None = None,
    first_command: tuple[Sequence[str], str] | None = None,
    policy: Policy | None = None,
    includes: Sequence[str] = (),
    take_over: DetachedRecord | None = None,
    pipelined: bool = False,
) -> AsyncIterator[Session]:
    """Connect, mount ``root`` on the remote, and yield the session; always cleans up.

    ``watch``: the caller will send every local change (``Session.invalidate``), so the
    remote kernel may cache metadata longer. ``spawned``: ssh started already
    (``transport.spawn_ssh``), so the connection was made while Python imported.
    ``first_command``: (argv, cwd) of the command to run first, whose inputs are
    hashed for its manifest while the connection is made. ``policy``: what the remote
    may write and see (default: the default rules); a root it refuses is a UsageError.
    ``includes``: local paths every command's manifest adds (``--include``).
    ``take_over``: the record of a detached session to attach to (attach.py) instead
    of starting one. ``pipelined``: the caller runs a command at once, which goes out
    behind the Hello: the session is yielded before the agent's Welcome (``ready``)."""
    try:
        policy = policy or Policy.from_options(PolicyOptions())
        root_path = checked_root(root, policy.options.allow_home)
        try:
            server = FileServer(root_path, policy=policy)
        except OSError as e:
            raise UsageError(f"--root {root}: {e.strerror}") from None
    except BaseException:
        if spawned is not None:
            spawned.kill()
            spawned.wait()
        raise
    left = False
    try:
        ssh = attach_ssh(spawned) if spawned is not None else await start_ssh(settings)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ssh.pump_stderr)
                session = Session(settings, server, ssh, nursery)
                if take_over is not None:
                    session.session_id, session.secret = take_over.session, take_over.secret
                session.watch = watch
                session.includes = [os.path.abspath(p) for p in includes]
                if first_command is not None:
                    session.prepare_manifest(*first_command)
                try:
                    await session._handshake(
                        connect_timeout, take_over is not None, wait=not pipelined
                    )
                    if session.reconnector is not None:
                        session.record = _record(session, policy, take_over)
                    yield session
                    with trio.CancelScope(shield=True):
                        await session.goodbye()
                finally:
                    with trio.CancelScope(shield=True):
                        if session.record is not None:
                            session.record.remove()
                        # After Closing (Run.close_after) the session is over on both
                        # sides: neither the agent's last acknowledgements nor ssh's
                        # exit are waited for (ssh is left to end by itself).
                        left = session.exit_after and session.closed is not None
                        if session.reconnector is not None:
                            await session.reconnector.close(settled=left)
                        ssh = session.ssh  # a reconnect may have replaced it
                        await ssh.stop(grace=0 if left else 5.0)
                    nursery.cancel_scope.cancel()
        finally:
            if ssh.returncode is None and not left:
                ssh.kill()
    finally:
        server.close()


def _record(session: Session, policy: Policy, record: DetachedRecord | None) -> Writer | None:
    """The record `attach` needs to take this session over (detached.py)."""
    from .detached import Record, Writer

    if record is None:
        protect, hide, read_only = policy.rules()
        remote, root = str(session.settings.remote), str(session.root)
        record = Record(session.session_id, session.secret, remote, root, protect, hide, read_only)
    try:
        return Writer(record)
    except OSError as e:  # the session runs on; only `attach` will not find it
        log.warning("could not record session %s for `attach`: %s", session.session_id, e)
        return None
