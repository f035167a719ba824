"""The stage backend: the root as a plain directory tree, for hosts without FUSE.

Before a job starts, every input its manifest names is materialized at the session
mountpoint from the content store, with the chain of directories down to its working
directory and the directories its arguments name. Transfers go through the shared
read cache, so the window, the prefetch and the store are the FUSE backend's: warm
inputs move no bytes.

A staged file is a reflink of its store object where the file system has them, else
the object itself, lent: moved out of the store into the tree, and moved back when
the session ends if the tree still holds it unchanged (a copy was a full write of
every input on the remote disk). Never a hardlink: a job that writes into an input
would write through into the store, which would hand the changed bytes out as the old
content later. A lent object is simply absent from the store meanwhile (another
session fetches it again); an object another session is reading is copied instead.

Outputs are found by comparing the tree with what was staged or committed: a regular
file that is new or changed is snapshotted into the spool and committed home through
the same verified commit path (and the client's write policy). While jobs run, the
tree is checked after each change the watcher reports (watchfiles' inotify, or a
poll where it cannot watch); a file some process still has open for writing waits
(on Linux a read lease tells; elsewhere the file must be quiet for one scan). When a
job ends, everything changed is committed before its exit is reported. Inputs the job
deleted or renamed are not deleted on the client: only new and changed files travel.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from ..client.inputs import path_word
from ..wire import proto
from . import hostos, winhost
from .backend import BackendContext
from .filecopy import clone_or_copy, reflinks_work
from .spool import SpoolFile
from .store import OUTPUT_KEEP_LIMIT

log = logging.getLogger(__name__)

STAGE_PARALLEL = 8  # inputs staged at once: one waits for its bytes, others copy theirs
POLL_EVERY = 0.5  # seconds between scans while jobs run, without a watcher
WATCHED_POLL_EVERY = 2.0  # with one: a safety net for changes it did not report


@dataclass(frozen=True)
class Seen:
    """What a tree file looked like when we last staged or committed it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    links: int = 1

    @classmethod
    def of(cls, st: os.stat_result) -> Seen:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_nlink)


def open_for_writing_elsewhere(path: Path) -> bool | None:
    """Whether some process has ``path`` open for writing; None where we cannot tell.

    On Linux a read lease is refused (EAGAIN) exactly when a writer has the file open."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl

    setlease = fcntl.F_SETLEASE
    try:
        fd = os.open(path, os.O_RDONLY | hostos.CLOEXEC | hostos.NOFOLLOW | hostos.NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, setlease, fcntl.F_RDLCK)
        fcntl.fcntl(fd, setlease, fcntl.F_UNLCK)
        return False
    except OSError as e:
        return True if e.errno == errno.EAGAIN else None
    finally:
        os.close(fd)


class StageBackend:
    """The root as a directory tree the agent fills and reads back."""

    name = "stage"
    plain_directory = True

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.tree = ctx.mountpoint
        self.temp_dir = ctx.session_dir / "staging"  # same file system: reflinks work
        self.entries: dict[int, list[proto.ManifestEntry]] = {}
        self.seen: dict[bytes, Seen] = {}  # tree files as staged or last committed
        # The client's version of each staged or committed file, (size, mtime_ns): a
        # manifest naming another version stages it again.
        self.origin: dict[bytes, tuple[int, int]] = {}
        self.stale: set[bytes] = set()  # changed on the client since staged
        self.dirs: set[bytes] = {b""}  # directories that exist on the client too
        self.sent: dict[bytes, SpoolFile] = {}  # each path's last commit
        # Tree files whose content is known (committed outputs, inputs the store
        # lent): blake3, and the file as it was then. Unchanged at the session's end,
        # they become store objects (again).
        self.known: dict[bytes, tuple[bytes, Seen]] = {}
        self.quiet: dict[bytes, Seen] = {}  # candidates as the previous scan saw them
        self.writing: set[bytes] = set()  # a writer had these open at the last look
        self.modes: dict[bytes, int] = {}  # client modes of programs run from the tree
        self._scan_lock = trio.Lock()
        self._wake = trio.Event()
        self._started = False
        self._stopped = False
        self._ending = False  # the session is ending (``ending`` ran)
        self._stop_watching = trio.Event()  # watchfiles' thread reads it to stop
        self.poll_every = POLL_EVERY
        self.windows = sys.platform == "win32"  # refuse names Windows cannot hold
        self.reflinks = False  # whether the tree's file system makes them (start)

    # --- the seam -------------------------------------------------------------------

    def start(self) -> None:
        self.tree.mkdir(mode=0o700, exist_ok=True)
        self.temp_dir.mkdir(mode=0o700, exist_ok=True)
        self.reflinks = reflinks_work(self.temp_dir)  # else inputs are lent (_bring)
        self._started = True
        self.ctx.nursery.start_soon(self._watch)

    @property
    def ready(self) -> bool:
        return self._started and not self._stopped

    def inputs(self, job: int, entries: list[proto.ManifestEntry]) -> None:
        self.entries.setdefault(job, []).extend(entries)

    async def prepare(self, job: int, run: proto.Run) -> None:
        """Stage the directories ``run`` needs and every input of ``job``'s manifest.

        On Windows, a name the tree cannot hold is refused first, in one line."""
        entries = self.entries.pop(job, [])
        if self.windows:
            cwd = self._relative(run.cwd, str(self.tree)) or b""
            paths = [os.fsdecode(p) for p in (cwd, *(e.path for e in entries))]
            problem = winhost.path_problem(paths, str(self.tree))
            if problem:
                raise OSError(errno.EINVAL, problem)
        await self._stage_dirs(run, {e.path for e in entries})
        slots = trio.Semaphore(STAGE_PARALLEL)
        async with trio.open_nursery() as nursery:
            for entry in entries:
                await slots.acquire()
                nursery.start_soon(self._stage_one, entry, slots)

    async def _stage_one(self, entry: proto.ManifestEntry, slots: trio.Semaphore) -> None:
        try:
            await self._stage_file(entry)
        except OSError as e:
            # As under FUSE, where such an input fails at the job's open: the job runs
            # and says what it misses.
            log.warning("could not stage %r: %s", entry.path, e)
        finally:
            slots.release()

    async def settle(self, job: int, alone: bool) -> None:
        """Commit everything the tree holds that is new or changed, and wait for it.

        Staged outputs carry no record of which job wrote them, so every job waits for
        all pending commits (a job running beside others may wait for theirs). Beside
        others, a file some process still writes is left to the scan that sees it
        closed (or to its own job's end), so no half-written version goes home."""
        await self._final_scan(job if alone else None, force=alone)

    def committed(self, sf: SpoolFile, digest: bytes, size: int) -> None:
        """Noted, not copied: the file goes into the store when the session ends
        (``_give_to_store``), where a copy now would cost a full write of it."""
        rel = sf.path
        if size <= OUTPUT_KEEP_LIMIT and rel is not None and self.sent.get(rel) is sf:
            self.known[rel] = (digest, self.seen[rel])

    def take_refused(self, job: int, *, everyone: bool) -> list[proto.Refused]:
        """None: the policy refuses staged outputs at their commit (named as lost)."""
        return []

    async def invalidate(self, paths: list[bytes]) -> None:
        """Stage these again when a command names them; the read cache must not hand
        out its copy of the old version (a same-size edit keeps size and mtime)."""
        self.stale.update(paths)
        for path in paths:
            self.ctx.cache.drop_path(path)

    async def ending(self) -> None:
        """Note the changed files some process still writes, before the jobs die."""
        self._ending = True
        self.writing = set()  # what earlier scans saw open may have been closed since
        _, files = await trio.to_thread.run_sync(self._walk)
        for rel, st in files:
            changed = self.seen.get(rel) != Seen.of(st)
            if changed and open_for_writing_elsewhere(self.tree / os.fsdecode(rel)):
                self.writing.add(rel)

    async def quiesce(self) -> None:
        """Every changed file to the spool: committed, or kept (as partial where
        ``ending`` saw a writer); then the outputs that went home to the store."""
        await self._final_scan(None, force=True)
        await trio.to_thread.run_sync(self._give_to_store)

    def _give_to_store(self) -> None:
        """Move into the content store each committed output, and each input the
        store lent, that the jobs left as it was: the tree is deleted next, so this
        costs no byte of copying (where the FUSE backend copies each output as it is
        committed). Not before: a later command of the session may still read or
        change it."""
        for rel, (digest, seen) in self.known.items():
            path = self.tree / os.fsdecode(rel)
            try:
                if Seen.of(os.lstat(path)) != seen:
                    continue
                if open_for_writing_elsewhere(path):
                    continue  # a process the jobs left behind may change it yet
                self.ctx.cache.store.take(path, digest, seen.size)
            except OSError as e:
                log.info("could not keep %r in the store: %s", rel, e)
        self.known.clear()

    async def stop(self) -> None:
        """Stop watching; the session removes the tree with its directory."""
        self._stopped = True
        self._stop_watching.set()
        self._wake.set()

    # --- inputs ---------------------------------------------------------------------

    def _relative(self, remote: str, cwd: str) -> bytes | None:
        full = os.path.normpath(os.path.join(cwd, remote))
        top = str(self.tree)
        if full == top:
            return b""
        if not full.startswith(top + os.sep):
            return None
        return os.fsencode(full[len(top) + 1 :]).replace(os.sep.encode(), b"/")

    async def _stage_dirs(self, run: proto.Run, inputs: set[bytes]) -> None:
        """The chain down to the job's cwd, directories its arguments name, and the
        directory an argument's new file goes into (an output directory); and the mode
        of a program run from the tree (``./run.sh``), which the manifest lacks.

        One ``Stat`` per argument that is neither a known input nor a known directory."""
        cwd = self._relative(run.cwd, str(self.tree))
        if cwd is not None:
            await self._ensure_dir(cwd)
        program = self._relative(run.argv[0], run.cwd) if run.argv else None
        if program in inputs:
            assert program is not None
            try:
                self.modes[program] = (await self._client_attr(program)).mode
            except OSError:
                pass
        for arg in run.argv:
            value = path_word(arg)
            rel = self._relative(value, run.cwd) if value else None
            if rel is None or rel in self.dirs or rel in inputs:
                continue
            try:
                attr = await self._client_attr(rel)
            except OSError:
                parent = rel.rpartition(b"/")[0]
                if parent in self.dirs:
                    continue
                try:
                    if stat.S_ISDIR((await self._client_attr(parent)).mode):
                        await self._ensure_dir(parent)
                except OSError:
                    pass
                continue
            if stat.S_ISDIR(attr.mode):
                await self._ensure_dir(rel)

    async def _client_attr(self, rel: bytes) -> proto.Attr:
        res = await self.ctx.link.call(proto.Stat(rel), proto.PRIO_URGENT)
        attr: proto.Attr = res.attr
        return attr

    async def _ensure_dir(self, rel: bytes) -> None:
        """``rel`` and its parents exist in the tree (they exist on the client)."""
        parts = [p for p in rel.split(b"/") if p]
        for i in range(1, len(parts) + 1):
            sub = b"/".join(parts[:i])
            if sub in self.dirs:
                continue
            target = self.tree / os.fsdecode(sub)
            try:
                target.mkdir(mode=0o755)
            except FileExistsError:
                if not target.is_dir():
                    raise OSError(errno.ENOTDIR, f"{os.fsdecode(sub)} is not a directory") from None
            self.dirs.add(sub)

    async def _stage_file(self, e: proto.ManifestEntry) -> None:
        """Materialize one input from the store (fetching it first if needed)."""
        path = e.path
        target = self.tree / os.fsdecode(path)
        if path not in self.stale and self.origin.get(path) == (e.size, e.mtime_ns):
            try:
                if Seen.of(os.lstat(target)) == self.seen.get(path):
                    return  # staged already, and neither side changed it
            except OSError:
                pass
        await self._ensure_dir(path.rpartition(b"/")[0])
        attr = proto.Attr(stat.S_IFREG | 0o644, e.size, e.mtime_ns, 0, 0)
        temp, lent = await self._bring(path, attr)
        # Into place and on record in one step of this thread: a scan never sees a
        # staged input that is not on record (it would take it for an output).
        try:
            os.replace(temp, target)
            st = os.lstat(target)
        except OSError:
            temp.unlink(missing_ok=True)
            raise  # (a lent object is lost to the store: fetched again when needed)
        self.seen[path] = Seen.of(st)
        self.origin[path] = (e.size, e.mtime_ns)
        if lent is not None:  # back to the store at the session's end, if unchanged
            self.known[path] = (lent, self.seen[path])
        else:
            self.known.pop(path, None)
        self.stale.discard(path)
        self.quiet.pop(path, None)

    async def _bring(self, path: bytes, attr: proto.Attr) -> tuple[Path, bytes | None]:
        """A new file beside the tree with the content of ``path``, and the digest of
        the store object lent for it, if one was.

        A reflink of the store object where the file system has them; else the object
        itself, lent by the store (a rename: a copy was a full write of every input on
        the remote disk), when no other session reads it; else a copy. The content
        was fetched into the store first if it lacked it."""
        cache = self.ctx.cache
        cached = await cache.open(path, attr)
        cache.job_opened(cached)
        held = True  # released at the end, unless let go for a lend
        try:
            await cached.wait_complete()
            mode = (self.modes.get(path, cached.attr.mode) & 0o777) | 0o600
            if not self.reflinks:
                digest = await cached.wait_stored()
                if digest is not None and cache.let_go(cached):
                    held = False
                    lent = await trio.to_thread.run_sync(
                        self._lend, digest, attr.size, attr.mtime_ns, mode
                    )
                    if lent is not None:
                        return lent, digest
                    cached = await cache.open(path, attr)  # a session reads it: a copy
                    held = True
                    await cached.wait_complete()
            temp = await trio.to_thread.run_sync(
                self._materialize, cached.fd, attr.size, attr.mtime_ns, mode
            )
            return temp, None
        finally:
            if held:
                cache.release(cached)

    def _new_temp(self, mode: int) -> tuple[Path, int]:
        """An empty file of ours beside the tree (same file system: reflinks and
        renames work)."""
        for n in range(1000):
            temp = self.temp_dir / f"{os.getpid()}-{n}"
            try:
                return temp, os.open(
                    temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | hostos.CLOEXEC, mode
                )
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "no free staging name")

    def _materialize(self, src_fd: int, size: int, mtime_ns: int, mode: int) -> Path:
        """A private copy of the content (a reflink where the file system has them),
        with the client's mtime, beside the tree."""
        temp, fd = self._new_temp(mode)
        try:
            clone_or_copy(src_fd, fd, size)
            hostos.fchmod(fd, temp, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return temp

    def _lend(self, digest: bytes, size: int, mtime_ns: int, mode: int) -> Path | None:
        """The store object itself beside the tree, with the client's mode and mtime;
        None if the store would not lend it."""
        temp, fd = self._new_temp(mode)
        os.close(fd)
        try:
            if not self.ctx.cache.store.lend(digest, size, temp):
                temp.unlink(missing_ok=True)
                return None
            os.chmod(temp, mode)
            os.utime(temp, ns=(mtime_ns, mtime_ns))
        except OSError:
            temp.unlink(missing_ok=True)  # (a lent object is lost to the store)
            raise
        return temp

    # --- outputs --------------------------------------------------------------------

    async def _watch(self) -> None:
        """While the session lives: look for finished outputs after each change."""
        waker = self._watchfiles_waker()
        if waker is not None:
            self.poll_every = WATCHED_POLL_EVERY
            self.ctx.nursery.start_soon(waker)
        while not self._stopped:
            with trio.move_on_after(self.poll_every):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._stopped:
                return
            if self.ctx.running_jobs():
                try:
                    await self._scan(final=False, owner=self._sole_job())
                except OSError as e:
                    log.info("scanning the staged tree failed: %s", e)

    def _watchfiles_waker(self) -> Callable[[], Awaitable[None]] | None:
        """A task that wakes the scanner on each batch of changes, or None (poll)."""
        try:
            import watchfiles
        except ImportError:
            return None

        async def wake() -> None:
            try:
                async for _ in watchfiles.awatch(
                    self.tree, debounce=200, step=50, stop_event=self._stop_watching
                ):
                    self._wake.set()
            except Exception as e:  # noqa: BLE001 - fall back to polling, say why
                log.info("watching the staged tree failed (%s): polling instead", e)
            self.poll_every = POLL_EVERY

        return wake

    def _sole_job(self) -> int | None:
        jobs = self.ctx.running_jobs()
        return jobs[0] if len(jobs) == 1 else None

    def _walk(self) -> tuple[list[bytes], list[tuple[bytes, os.stat_result]]]:
        """Directories and regular files under the tree (top-down, by name)."""
        dirs: list[bytes] = []
        files: list[tuple[bytes, os.stat_result]] = []
        pending = [b""]
        while pending:
            rel = pending.pop()
            try:
                entries = sorted(os.scandir(self.tree / os.fsdecode(rel)), key=lambda d: d.name)
            except OSError:
                continue
            for d in entries:
                sub = os.fsencode(d.name) if not rel else rel + b"/" + os.fsencode(d.name)
                try:
                    st = d.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    dirs.append(sub)
                    pending.append(sub)
                elif stat.S_ISREG(st.st_mode):
                    files.append((sub, st))
        dirs.sort()
        return dirs, files

    async def _final_scan(self, owner: int | None, *, force: bool) -> None:
        async with self._scan_lock:
            await self.ctx.spool.wait_idle()  # a path's earlier commit ends first
        await self._scan(final=force, owner=owner)
        await self.ctx.spool.wait_idle()

    async def _scan(self, *, final: bool, owner: int | None) -> None:
        """Commit what changed: everything (``final``), or what looks finished."""
        async with self._scan_lock:
            dirs, files = await trio.to_thread.run_sync(self._walk)
            for rel in dirs:
                if rel not in self.dirs:
                    await self._make_client_dir(rel)
            # A final scan comes when the job that ran alone has ended, or when the
            # session ends with its jobs killed: no job writes the tree, so outputs are
            # read in place (one that a process they left behind changes is caught by
            # the commit's check).
            in_place = final
            for rel, st in files:
                now = Seen.of(st)
                if self.seen.get(rel) == now:
                    continue
                if not final and not self._finished(rel, now):
                    continue
                await self._commit(rel, st, owner, in_place)

    def _finished(self, rel: bytes, now: Seen) -> bool:
        """Whether a changed file looks whole: no writer has it open, or (where that
        cannot be told) it did not change since the previous scan."""
        previous, self.quiet[rel] = self.quiet.get(rel), now
        open_now = open_for_writing_elsewhere(self.tree / os.fsdecode(rel))
        if open_now:
            self.writing.add(rel)
        else:
            self.writing.discard(rel)
        if open_now is not None:
            return not open_now
        return previous == now

    async def _make_client_dir(self, rel: bytes) -> None:
        try:
            await self.ctx.link.call(proto.Mkdir(rel, 0o755), proto.PRIO_URGENT)
        except FileExistsError:
            pass
        except OSError as e:
            log.info("could not make %r on the client: %s", rel, e)
            return
        self.dirs.add(rel)

    async def _commit(
        self, rel: bytes, st: os.stat_result, owner: int | None, in_place: bool = False
    ) -> None:
        """Snapshot one output into the spool and schedule its commit (``in_place``:
        no snapshot, the spool reads the tree's file and checks it did not change)."""
        spool = self.ctx.spool
        previous = self.sent.get(rel)
        if previous is not None and (previous.dirty or previous.lock.locked()):
            return  # its last version is still on the way; a later scan sends this one
        if previous is not None and previous.expect is not None:
            expect: proto.Attr | None = previous.expect
        elif rel in self.origin:
            size, mtime_ns = self.origin[rel]
            expect = proto.Attr(stat.S_IFREG | 0o644, size, mtime_ns, 0, 0)
        else:
            # A new file. Should the client have one of that name the job never saw
            # (no argument named it), it is not replaced: the output lands beside it.
            expect = None
        source = self.tree / os.fsdecode(rel)
        if in_place:
            try:
                fd = os.open(source, os.O_RDONLY | hostos.CLOEXEC | hostos.NOFOLLOW)
            except OSError as e:
                log.info("could not open %r for its commit: %s", rel, e)
                return
            taken = os.fstat(fd)
            if not stat.S_ISREG(taken.st_mode):
                os.close(fd)
                return
            sf = spool.borrow(rel, fd, stat.S_IMODE(taken.st_mode), expect)
            sf.dirty = False
        else:
            sf = spool.create(rel, stat.S_IMODE(st.st_mode), expect)
            sf.dirty = False
            try:
                snapshot = await trio.to_thread.run_sync(_snapshot, source, sf.fd)
            except OSError as e:
                spool.forget(sf)
                log.info("could not take %r for its commit: %s", rel, e)
                return
            if snapshot is None:  # changed while copied: a later scan takes it whole
                spool.forget(sf)
                return
            taken = snapshot
        sf.mtime_ns = taken.st_mtime_ns
        sf.owner = owner
        # The session ends and a killed job was still writing it: not a whole output.
        sf.partial = self._ending and rel in self.writing
        sf.dirty = True
        self.seen[rel] = Seen.of(taken)
        self.sent[rel] = sf
        self.quiet.pop(rel, None)
        spool.schedule(sf)


def _snapshot(source: Path, dst_fd: int) -> os.stat_result | None:
    """Copy ``source`` into ``dst_fd``; None if it changed meanwhile."""
    fd = os.open(source, os.O_RDONLY | hostos.CLOEXEC | hostos.NOFOLLOW)
    try:
        before = os.fstat(fd)
        clone_or_copy(fd, dst_fd, before.st_size)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return None
    os.ftruncate(dst_fd, after.st_size)
    return after
