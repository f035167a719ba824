"""One agent session: session dir, backend, jobs, and a teardown that always runs.

Order of life: ``Hello`` clears dead sessions, makes the session dir (0700) and opens
the backend that shows the job the root (``backend.py``: a FUSE mount or a staged
tree); each ``Run`` starts a job (several may run at once, each known by
the client's job id); when a job ends, every output it wrote is committed before its
``Exited`` goes out; ``Bye`` (or a lost connection) stops the backend and removes
the session dir. The teardown is idempotent and runs on every path out, shielded from
cancellation, so no mount or session dir is left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..policy import Policy
from ..wire import liveness, pacing, proto
from ..wire.rpc import Peer
from . import hostos, kept
from .backend import Backend, BackendContext, open_backend
from .job import Job
from .kept import KeptSession
from .link import ClientLink
from .readcache import ReadCache
from .replay import Replay
from .spool import Spool
from .store import ContentStore

log = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CAPABILITIES = ["exec", "manifest", "jobs", "tty", "invalidate", liveness.CAPABILITY]
PREFETCH_WINDOW = 2 << 30
MAX_JOBS = 64
MANIFEST_WAIT = 30.0  # a Run said its Manifest was sent: how long it waits for it


def _at_mountpoint(req: proto.Run, mountpoint: str) -> proto.Run:
    """The Run with ``proto.ROOT_MARKER`` (a command sent behind the Hello, before the
    client knew the mountpoint) swapped for the mountpoint."""

    def swap(text: str) -> str:
        return text.replace(proto.ROOT_MARKER, mountpoint)

    return msgspec.structs.replace(
        req,
        argv=[swap(a) for a in req.argv],
        cwd=swap(req.cwd),
        env={k: swap(v) for k, v in req.env.items()},
    )


def mounted_fuse_points() -> set[str]:
    points: set[str] = set()
    if not os.path.exists("/proc/mounts"):  # not Linux: no FUSE mounts of ours
        return points
    with open("/proc/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2].startswith(b"fuse"):
                points.add(fields[1].decode("unicode_escape"))
    return points


def unmount(path: Path) -> None:
    if str(path) in mounted_fuse_points():
        subprocess.run(
            ["fusermount3", "-u", "-z", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


def collect_dead_sessions(sessions_dir: Path) -> list[str]:
    """Remove session dirs whose agent is gone (its lock is free); returns their ids.

    Two agents starting at once each run this: the other's new dir must survive the
    moment between creating its lock file and locking it (seen: a concurrent session
    failed with ENOENT when its dir was removed under it)."""
    removed: list[str] = []
    if not sessions_dir.is_dir():
        return removed
    for entry in sessions_dir.iterdir():
        lock_path = entry / "agent.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | hostos.CLOEXEC)
        except FileNotFoundError:
            # No lock: half created (young) or half removed (old). Only the old go.
            try:
                if time.time() - entry.stat().st_mtime > 60:
                    unmount(entry / "root")
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            hostos.lock(fd, exclusive=True, wait=False)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            # An empty lock: its agent has created it and not locked it yet (it writes
            # its pid once it holds the lock). Only an old one is an agent that died there.
            if os.fstat(fd).st_size == 0 and _young(entry):
                continue
            _kill_orphaned_jobs(entry / "jobs")
            unmount(entry / "root")
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        finally:
            os.close(fd)
    return removed


def _young(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime <= 60
    except OSError:
        return True  # gone meanwhile: nothing to collect


def _parent_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _kill_orphaned_jobs(jobs_file: Path) -> None:
    """A dead agent's commands may still run (their helpers, say): end their groups."""
    try:
        pgids = [int(x) for x in jobs_file.read_text().split()]
    except (OSError, ValueError):
        return
    for pgid in pgids:
        try:
            hostos.kill_group(pgid, hostos.SIGKILL)
        except PermissionError:
            pass


class AgentSession:
    def __init__(
        self,
        base_dir: Path,
        cache_cap: int | None = None,
        keepalive: liveness.Timing | None = None,
        backend: str = "auto",
    ) -> None:
        self.base_dir = base_dir
        self.backend_choice = backend
        self.cache_cap = cache_cap
        self.keepalive = keepalive or liveness.Timing()
        self.client_root = ""
        self.store: ContentStore | None = None
        self.sessions_dir = base_dir / "sessions"
        self.dir: Path | None = None
        self.mountpoint: Path | None = None
        self.lock_fd = -1
        self.backend: Backend | None = None
        self.backend_note = ""  # why ``auto`` chose to stage, for the client's -v
        self.jobs: dict[int, Job] = {}
        self._baselines: dict[int, dict[str, int]] = {}
        self.cache: ReadCache | None = None
        self.spool: Spool | None = None
        self.finished = trio.Event()
        # A Run or Manifest sent behind the Hello waits for its answer (``_set_up``);
        # a Run with ``after_manifest`` also for its Manifest (``_manifested``).
        self.welcomed = trio.Event()
        self._manifested: dict[int, trio.Event] = {}
        self.torn_down = False
        self.connection_lost = False
        self.kept = (0, 0)  # outputs (files, bytes) the teardown could not commit
        # A detachable session (host.py): a new client may take it over (``switch``),
        # so each job's output and status are kept for it (replay.py).
        self.detachable = False
        self.replay = Replay()
        self._told = trio.Lock()  # a job's output goes out in order, a replay between
        self._next_stream: trio.abc.Stream | None = None
        self._replayed = 0  # the client (link.epoch) that has had its replay

    async def serve(self, stream: trio.abc.Stream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.stream = stream
                self.peer = Peer(stream, self.on_call, self.on_notice)
                self.link = ClientLink(self.peer)
                nursery.start_soon(self._run_peer)
                await self.finished.wait()
                with trio.CancelScope(shield=True):
                    await self.teardown()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.teardown()

    def switch(self, stream: trio.abc.Stream) -> None:
        """A new client process takes the session over on ``stream`` (host.py): the
        current Peer's stream is ended by the caller, and ``_run_peer`` goes on with a
        Peer on this one."""
        self._next_stream = stream
        self.link.begin_switch()

    async def _run_peer(self) -> None:
        try:
            while True:
                try:
                    await self.peer.run()
                except proto.ProtocolError as e:
                    log.error("protocol error from the client: %s", e)  # as a lost connection
                if self._next_stream is None or self.torn_down:
                    break
                pacer = self.peer.pacer
                self.stream, self._next_stream = self._next_stream, None
                self.peer = Peer(self.stream, self.on_call, self.on_notice)
                self.peer.pacer = pacer
                self.link.switch(self.peer)
                log.warning("a new client took the session over")
        finally:
            if not self.torn_down:
                self.connection_lost = True
                log.warning("connection to the client ended")
            self.finished.set()

    async def _client_silent(self, seconds: float) -> None:
        """No byte from the client for ``seconds``: the link is dead or stalled. Closing
        our end fails every call in flight at once and starts the teardown."""
        log.warning("nothing from the client for %.0f s: ending the session", seconds)
        self.connection_lost = True
        await self.stream.aclose()

    # --- calls from the client ------------------------------------------------------

    async def on_call(self, req: Any) -> Any:
        if isinstance(req, proto.Hello):
            return await self._hello(req)
        if isinstance(req, proto.Run):
            await self._set_up()
            if req.after_manifest:
                with trio.move_on_after(MANIFEST_WAIT):
                    await self._manifest_event(req.job).wait()
            return await self._run(_at_mountpoint(req, str(self.mountpoint)))
        if isinstance(req, proto.Manifest):
            await self._set_up()
            try:
                return self._manifest(req)
            finally:
                self._manifest_event(req.job).set()
        if isinstance(req, proto.Status):
            return self._status()
        if isinstance(req, proto.RecoverKept):
            if self.spool is None or self.dir is None:
                raise OSError(errno.ENOTCONN, "no mount: send Hello first")
            return await kept.recover(self.base_dir, self.client_root, self.spool, self.dir.name)
        if isinstance(req, proto.Reattach):
            return await self._reattach(req)
        if isinstance(req, proto.Bye):
            await self.teardown(force=req.force)
            return self._closed()
        raise OSError(errno.ENOSYS, f"the agent does not serve {type(req).__name__}")

    async def on_notice(self, msg: Any) -> None:
        if isinstance(msg, proto.Hashed) and self.cache is not None:
            handle = self.link.handle_of(msg.handle)
            if handle is not None:
                self.nursery.start_soon(self.cache.on_hashed, handle, msg.blake3)
            return
        if isinstance(msg, proto.Invalidate) and self.backend is not None:
            self.nursery.start_soon(self.backend.invalidate, msg.paths)
            return
        job = self.jobs.get(getattr(msg, "job", -1))
        if job is None:
            return
        if isinstance(msg, proto.Signal):
            job.signal(msg.signum)
        elif isinstance(msg, proto.StdinData):
            await job.write_stdin(msg.data)
        elif isinstance(msg, proto.StdinClose):
            await job.close_stdin()
        elif isinstance(msg, proto.Resize):
            job.resize(msg.rows, msg.cols)

    async def _set_up(self) -> None:
        """Wait for the Hello this call came behind (set when it is answered, or the
        session ends), so a client may send its first command without a round trip."""
        await self.welcomed.wait()
        if self.dir is None:
            raise OSError(errno.ENOTCONN, "no mount: send Hello first")

    def _manifest_event(self, job: int) -> trio.Event:
        event = self._manifested.get(job)
        if event is None:
            while len(self._manifested) >= MAX_JOBS:  # the oldest, long run
                del self._manifested[next(iter(self._manifested))]
            event = self._manifested[job] = trio.Event()
        return event

    async def _hello(self, req: proto.Hello) -> proto.Welcome:
        try:
            return await self._set_up_session(req)
        finally:
            self.welcomed.set()

    async def _set_up_session(self, req: proto.Hello) -> proto.Welcome:
        if req.version != proto.PROTOCOL_VERSION:
            raise OSError(
                errno.EPROTO,
                f"protocol mismatch: client speaks {req.version}, "
                f"agent speaks {proto.PROTOCOL_VERSION}; install the same topyaz-mount on both",
            )
        if self.dir is not None:
            raise OSError(errno.EALREADY, "session already set up")
        if not _SESSION_ID.match(req.session_id):
            raise OSError(errno.EINVAL, "bad session id")
        for sid in collect_dead_sessions(self.sessions_dir):
            log.info("removed dead session %s", sid)
        self._make_session_dir(req.session_id)
        assert self.dir is not None and self.mountpoint is not None
        self.client_root = req.root
        self.peer.pacer = pacing.bucket(req.bwlimit)  # --bwlimit: our output stream
        if liveness.CAPABILITY in req.capabilities:
            self.nursery.start_soon(liveness.watch, self.peer, self.keepalive, self._client_silent)
        # A client that watches its root pushes every change (Invalidate), so the
        # kernel may keep entries and attributes long; without one, 5 s bounds staleness.
        policy = None
        if req.policy is not None:
            policy = Policy(req.policy.protect, req.policy.hide, req.policy.read_only)
        self._build_filesystem(30.0 if "watch" in req.capabilities else 5.0, policy)
        return proto.Welcome(
            proto.PROTOCOL_VERSION,
            req.session_id,
            str(self.mountpoint),
            os.getpid(),
            CAPABILITIES,
            self.backend.name if self.backend else "",
            self.backend_note,
        )

    async def _reattach(self, req: proto.Reattach) -> proto.Reattached:
        """A new client took the session over: what its predecessor had not written
        out is sent again (replay.py). The jobs' stdin ended with the old client."""
        if self.mountpoint is None or not self.detachable or self.link.epoch == 0:
            raise OSError(errno.EINVAL, "Reattach is for a client taking a session over")
        async with self._told:
            for msg in self.replay.messages(req.offsets):
                await self.link.notify(msg)
            self._replayed = self.link.epoch
        for job in list(self.jobs.values()):
            if job.want_stdin:
                await job.close_stdin()
        jobs = sorted(set(self.jobs) | set(self.replay.exits))
        return proto.Reattached(jobs, str(self.mountpoint))

    def _closed(self) -> proto.Closed:
        kept_dir = "" if self.spool is None else str(self.spool.kept.dir)
        return proto.Closed(*self.kept, kept_dir if self.kept[0] else "")

    async def _tell(self, msg: Any) -> None:
        """A job's output or status for the client. In a detachable session it is
        kept (replay.py) and a client gone meanwhile is no error: the next one gets it."""
        async with self._told:
            if self.detachable and isinstance(msg, proto.Output):
                self.replay.output(msg.job, msg.fd, msg.data)
            elif self.detachable and isinstance(msg, proto.Exited):
                self.replay.exited(msg)
            if self.link.epoch != self._replayed:
                return  # a new client not yet told the rest: its replay has this
            try:
                await self.link.notify(msg)
            except OSError:
                if not self.detachable:
                    raise

    def _make_session_dir(self, session_id: str) -> None:
        self.sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.sessions_dir / session_id
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise OSError(errno.EEXIST, f"session {session_id} exists already") from None
        self.dir = path
        self.lock_fd = os.open(path / "agent.lock", os.O_RDWR | os.O_CREAT | hostos.CLOEXEC, 0o600)
        hostos.lock(self.lock_fd, exclusive=True)
        os.write(self.lock_fd, f"{os.getpid()}\n".encode())
        for sub in ("root", "spool"):
            (path / sub).mkdir(mode=0o700)
        self.mountpoint = path / "root"

    def _build_filesystem(self, cache_timeout: float, policy: Policy | None) -> None:
        assert self.dir is not None and self.mountpoint is not None
        self.store = ContentStore(self.base_dir, self.cache_cap)
        self.store.clear_stale_temps()
        self.cache = ReadCache(self.store, self.link, self.nursery)
        kept = KeptSession(self.base_dir, self.dir.name, self.client_root)
        self.spool = Spool(self.dir / "spool", kept, self.link, self.nursery)
        ctx = BackendContext(
            self.link,
            self.cache,
            self.spool,
            self.nursery,
            self.dir,
            self.mountpoint,
            cache_timeout,
            policy,
            self.job_of_pid,
            lambda: list(self.jobs),
        )
        self.backend, self.backend_note = open_backend(self.backend_choice, ctx)
        self.spool.on_committed = self.backend.committed

    def job_of_pid(self, pid: int) -> int | None:
        """The job a process belongs to: the nearest ancestor that is a job's leader.

        Ancestry, not the process group: an interactive shell (``topyaz-mount shell``)
        puts each command it runs in a group of its own."""
        leaders = {job.pid: jid for jid, job in self.jobs.items()}
        for _ in range(64):
            if pid in leaders:
                return leaders[pid]
            if pid <= 1:
                return None
            pid = _parent_pid(pid)
        return None

    def _manifest(self, req: proto.Manifest) -> proto.Missing:
        if self.cache is None or self.store is None:
            raise OSError(errno.ENOTCONN, "no mount: send Hello first")
        if req.job not in self.jobs:  # the command's counters start here, with its prefetch
            self._baselines[req.job] = self.transfer_stats()
        self.cache.remember_manifest(req.entries)
        if self.backend is not None:
            self.backend.inputs(req.job, req.entries)
        missing = [
            i
            for i, e in enumerate(req.entries)
            if e.blake3 is None or not self.store.has(e.blake3, e.size)
        ]
        wanted = [
            (e.path, proto.Attr(stat.S_IFREG | 0o644, e.size, e.mtime_ns, 0, 0))
            for e in (req.entries[i] for i in missing)
        ]
        if wanted:
            self.nursery.start_soon(self.cache.prefetch, wanted, PREFETCH_WINDOW)
        return proto.Missing(missing)

    def transfer_stats(self) -> dict[str, int]:
        """Counters kept by the code that moves the bytes."""
        stats = {"content_bytes_received": 0, "content_bytes_committed": 0}
        if self.cache is not None:
            stats["content_bytes_received"] = self.cache.bytes_fetched
            stats["prefetch_hits"] = self.cache.prefetch_hits
            stats["followed_files"] = self.cache.followed
        if self.store is not None:
            stats.update(
                cache_hits=self.store.hits,
                cache_misses=self.store.misses,
                bytes_saved=self.store.bytes_saved,
            )
        if self.spool is not None:
            stats["content_bytes_committed"] = self.spool.bytes_committed
        return stats

    def _status(self) -> proto.StatusReply:
        pending = [] if self.spool is None else self.spool.dirty_files()
        in_flight = 0 if self.spool is None else self.spool.pending()
        size = 0
        for sf in pending:
            try:
                size += os.fstat(sf.fd).st_size
            except OSError:
                pass
        return proto.StatusReply(
            self.transfer_stats(),
            len(self.jobs),
            len(pending) + in_flight,
            size,
            self.backend.name if self.backend else "",
        )

    async def _run(self, req: proto.Run) -> proto.Started:
        if self.backend is None or not self.backend.ready or self.torn_down:
            raise OSError(errno.ENOTCONN, "no mount: send Hello first")
        if req.job in self.jobs:
            raise OSError(errno.EEXIST, f"job {req.job} is running already")
        if len(self.jobs) >= MAX_JOBS:
            raise OSError(errno.EAGAIN, f"{MAX_JOBS} commands run in this session already")
        tty = (req.tty[0], req.tty[1]) if req.tty is not None and len(req.tty) == 2 else None
        argv = list(req.argv)
        if tty is not None and not argv:  # `topyaz-mount shell`: the user's login shell
            argv = [hostos.login_shell(), "-l"]
        job = Job(
            argv, req.cwd, dict(req.env), req.stdin, tty, plain_cwd=self.backend.plain_directory
        )
        await self.backend.prepare(req.job, req)
        if self.torn_down:
            raise OSError(errno.ENOTCONN, "the session ended while the inputs were staged")
        pid = await job.start()
        self.jobs[req.job] = job
        assert self.dir is not None
        with open(self.dir / "jobs", "a") as jobs:  # for collect_dead_sessions
            jobs.write(f"{pid}\n")
        before = self._baselines.pop(req.job, None) or self.transfer_stats()
        self.nursery.start_soon(self._watch_job, req.job, job, before, req.close_after)
        return proto.Started(pid)

    async def _watch_job(
        self, jid: int, job: Job, before: dict[str, int], close_after: bool
    ) -> None:
        """Forward the job's output; when it ends, commit its outputs, then report.

        The counters reported are the session's during the job's life (the difference
        from ``before``): exactly the job's own when it ran alone.
        """

        async def sink(fd: int, data: bytes) -> None:
            await self._tell(proto.Output(jid, fd, data))

        try:
            code = await job.run(sink)
            alone = len(self.jobs) == 1
            assert self.spool is not None and self.backend is not None
            await self.backend.settle(jid, alone)
            lost, notes = self.spool.take_reports(jid, everyone=alone)
            for note in notes:
                await self._tell(proto.Log("warning", note, jid))
            after = self.transfer_stats()
            stats = {k: v - before.get(k, 0) for k, v in after.items()}
            self.jobs.pop(jid, None)
            refused = self.backend.take_refused(jid, everyone=alone)
            await self._tell(proto.Exited(jid, code, lost, stats, refused))
            if close_after and not self.jobs:
                with trio.CancelScope(shield=True):  # the client leaves once told
                    await self.teardown(tell_closed=True)
        except OSError as e:
            log.warning("could not report the end of job %d: %s", jid, e)
        finally:
            self.jobs.pop(jid, None)

    # --- the end --------------------------------------------------------------------

    async def teardown(self, force: bool = False, tell_closed: bool = False) -> None:
        """End the jobs, commit or keep their outputs, then take the mount, caches and
        session directory down. ``tell_closed``: send Closed once what is kept is
        known (a Run with ``close_after``), so the client is gone while the rest runs."""
        if self.torn_down:
            return
        self.torn_down = True
        self.welcomed.set()  # nothing waits for a Hello any more
        if self.spool is not None:
            self.spool.mark_open_partial()  # what a job still writes now is not whole
            if force or self.connection_lost:  # nothing the killed jobs leave is sent
                self.spool.frozen = True
        if self.backend is not None and self.jobs:
            with trio.move_on_after(10):
                await self.backend.ending()
        async with trio.open_nursery() as nursery:
            for job in list(self.jobs.values()):
                nursery.start_soon(job.kill)
        if self.backend is not None:
            with trio.move_on_after(60):  # commits in flight fail at once if the link is gone
                await self.backend.quiesce()
        if self.spool is not None:
            if self.connection_lost:
                with trio.move_on_after(10):  # commits in flight fail at once: kept
                    await self.spool.wait_idle()
                await self.spool.keep_uncommitted("connection to the client lost")
            else:
                with trio.move_on_after(60):
                    await self.spool.wait_idle()
                files, size = await self.spool.keep_uncommitted(
                    "dropped by a forced unmount" if force else "session ended first"
                )
                self.kept = (self.kept[0] + files, self.kept[1] + size)
        if tell_closed:
            try:
                await self.link.notify(proto.Closing(self._closed()))
            except OSError as e:
                log.info("could not tell the client the session closed: %s", e)
        if self.backend is not None:
            await self.backend.stop()
        if self.cache is not None:
            with trio.move_on_after(120):
                await self.cache.wait_stored()
            self.cache.close()
        if self.store is not None:
            try:
                self.store.save_counters()
            except OSError as e:
                log.warning("could not save cache counters: %s", e)
        if self.spool is not None:
            self.spool.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
