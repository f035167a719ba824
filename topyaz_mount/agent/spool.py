"""Write-back buffer: what the job writes lands on the remote disk, then streams home.

A ``SpoolFile`` is the agent's authoritative copy of one output. Writes go to a local
file; when the last writer closes it, a commit streams it to the client (chunks as
notifications, then one ``CommitEnd`` carrying size and blake3 for the client to
verify). The job's exit is reported only after ``wait_idle``; an output that cannot be
committed is kept on the remote under ``kept/`` and named in the exit report, never
dropped.

Each spool file remembers which job last opened it for writing (its ``owner``), so a
session running several jobs at once reports each job's end once *its* outputs are
home, without waiting for (or committing half of) another job's files.

A spool file's lock is held for the whole of a commit; whoever wants to change the
file (open for writing, truncate, rename, unlink) takes it first, so a commit always
sends one consistent version.

Outputs follow renames. A commit names its file twice, when it begins (the client makes
the temporary file in that directory) and when it ends (the client renames it to the
path the end carries, which is where the file is *then*). A rename of a directory does
not wait for the commits below it: it only takes the ``naming`` lock of every spool file
it moves, which a commit holds while a request naming the file is in flight, so the
client never sees a rename and a commit's begin or end cross each other.

A write that failed (the remote disk full, say) leaves the spool copy incomplete: the
error sticks to the file (until the job truncates it to nothing), is returned at every
flush and fsync, and the file is never committed; the job's exit report names it.

Big outputs written front to back (a video encoder's, say) do not wait for the close:
once a new file passes ``STREAM_AFTER`` bytes, an upload starts and follows the writer,
so the transfer home overlaps the job. Any write behind what was already sent, a
truncate, rename or unlink breaks that upload; the commit at close then aborts it and
sends the file whole, as for any other output. The upload follows how far the file is
complete from its start (``WrittenFront``), not its size: the kernel's write-back may
deliver a later page before an earlier one, and an upload that read the hole between
them would have had to start over (seen under load: a 28 MiB output crossed twice).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import blake3
import trio

from ..wire import proto
from . import hostos
from .filecopy import clone_or_copy
from .kept import KeptSession
from .link import ClientLink

log = logging.getLogger(__name__)


STREAM_AFTER = 8 << 20
MAX_GAPS = 256  # writes ahead of the complete front: more, and the writer is not sequential
OWN_COPY_TRIES = 3  # a file read in place that keeps changing: private copies tried
MAX_RESENDS = 4  # a commit cut off by clients taking the session over, sent again


class SourceChanged(Exception):
    """A file the spool read in place changed before its commit ended."""


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file's content may have (ctime: any write, even one that
    restores the mtime)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Upload:
    """A commit in progress: what was sent so far, hashed in order."""

    def __init__(self, cid: int, path: bytes) -> None:
        self.cid = cid
        self.path = path
        self.hasher = blake3.blake3()
        self.sent = 0
        self.begun = False
        self.broken = False
        self.closing = False
        self.more = trio.Event()
        self.stopped = trio.Event()


class WrittenFront:
    """How far a file written from empty is complete from its start, and the writes
    that landed beyond that (start -> end), waiting for the gap before them."""

    def __init__(self) -> None:
        self.end = 0
        self.ahead: dict[int, int] = {}

    def add(self, offset: int, length: int) -> bool:
        """Record a write; False once too many gaps say it is not written front to back."""
        end = offset + length
        if offset > self.end:
            self.ahead[offset] = max(end, self.ahead.get(offset, 0))
            return len(self.ahead) <= MAX_GAPS
        self.end = max(self.end, end)
        while self.ahead:
            reached = [start for start in self.ahead if start <= self.end]
            if not reached:
                break
            for start in reached:
                self.end = max(self.end, self.ahead.pop(start))
        return True


class SpoolFile:
    def __init__(self, path: bytes, fd: int, mode: int, expect: proto.Attr | None) -> None:
        self.path: bytes | None = path  # None once unlinked
        self.fd = fd
        self.mode = mode & 0o7777
        self.expect = expect  # the client's file as we last knew it (None: absent)
        self.check = True  # refuse to overwrite a destination that changed meanwhile
        self.writers = 0
        self.dirty = False
        self.mtime_ns: int | None = None  # set explicitly by the job (utime)
        self.committed_path: bytes | None = None
        self.lock = trio.Lock()
        self.streamable = False  # written from empty since it was created or truncated
        self.front = WrittenFront()  # while streamable: how far it is complete
        self.upload: Upload | None = None  # an upload following the writer
        self.owner: int | None = None  # the job that last opened it for writing
        self.handles = 0  # open FUSE handles (readers and writers) that use ``fd``
        self.partial = False  # a writer still had it open when the session ended
        self.error: OSError | None = None  # a write into ``fd`` failed: never committed
        # Held while a commit request naming ``path`` is in flight, and by renames.
        self.naming = trio.Lock()
        self.serial = 0  # the order renames take ``naming`` locks in
        # Read in place from a file someone else owns (``Spool.borrow``): its identity
        # then, checked before the commit's end. None: ``fd`` is our private copy.
        self.borrowed: tuple[int, int, int, int] | None = None

    def raise_if_failed(self) -> None:
        """Why this copy is incomplete, as the job's close or fsync must hear it."""
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror)

    def attr(self) -> proto.Attr:
        st = os.fstat(self.fd)
        mtime = self.mtime_ns if self.mtime_ns is not None else st.st_mtime_ns
        return proto.Attr(stat.S_IFREG | self.mode, st.st_size, mtime, st.st_ctime_ns, mtime)


class Spool:
    def __init__(
        self, directory: Path, kept: KeptSession, link: ClientLink, nursery: trio.Nursery
    ) -> None:
        self.directory = directory
        self.kept = kept
        self.link = link
        self.nursery = nursery
        self.files: dict[bytes, SpoolFile] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int | None, int] = {}  # commits in flight, by owner
        self._changed = trio.Event()
        # (owner, text): outputs that could not be committed, and notes for the user.
        self.lost: list[tuple[int | None, str]] = []
        # The entries of ``lost`` for outputs refused after a failed write, by path: the
        # job may free room and write the file again, and that commit withdraws it.
        self._refused: dict[bytes, tuple[int | None, str]] = {}
        self.notes: list[tuple[int | None, str]] = []
        # Told of each committed output (its spool file, blake3, size), so the content
        # store can keep it: a later job that reads this output needs no transfer.
        self.on_committed: Callable[[SpoolFile, bytes, int], None] | None = None
        self.bytes_committed = 0
        self.frozen = False  # a forced unmount: start no more commits

    def get(self, path: bytes) -> SpoolFile | None:
        return self.files.get(path)

    def children(self, dir_path: bytes) -> dict[bytes, SpoolFile]:
        prefix = dir_path + b"/" if dir_path else b""
        return {
            p[len(prefix) :]: sf
            for p, sf in self.files.items()
            if p.startswith(prefix) and b"/" not in p[len(prefix) :]
        }

    def _new_fd(self) -> int:
        name = self.directory / str(next(self._ids))
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | hostos.CLOEXEC, 0o600)
        os.unlink(name)  # lives as long as the fd; see keep() for failed commits
        return fd

    def create(self, path: bytes, mode: int, expect: proto.Attr | None = None) -> SpoolFile:
        return self._add(path, self._new_fd(), mode, expect)

    def borrow(self, path: bytes, fd: int, mode: int, expect: proto.Attr | None) -> SpoolFile:
        """A spool file read in place from ``fd`` (the stage tree's file once no job
        runs), not from a private copy: the copy cost a full write of every output on
        the remote disk. Its commit checks before its end that the file did not change,
        and if it did, takes a private copy and sends that (``_own_copy``)."""
        sf = self._add(path, fd, mode, expect)
        sf.borrowed = identity(os.fstat(fd))
        return sf

    def _add(self, path: bytes, fd: int, mode: int, expect: proto.Attr | None) -> SpoolFile:
        old = self.files.get(path)
        if old is not None:
            old.path = None
        sf = SpoolFile(path, fd, mode, expect)
        sf.serial = next(self._ids)
        sf.dirty = True  # even an empty new file must appear on the client
        sf.streamable = expect is None
        self.files[path] = sf
        return sf

    def adopt(self, path: bytes, attr: proto.Attr, source_fd: int | None) -> SpoolFile:
        """Take over a client file to modify it, starting from its full content."""
        sf = self.create(path, attr.mode, expect=attr)
        sf.dirty = False
        if source_fd is not None and attr.size:
            try:
                clone_or_copy(source_fd, sf.fd, attr.size)
            except OSError:
                self.forget(sf)  # half a copy must never stand for the client's file
                raise
        return sf

    def forget(self, sf: SpoolFile) -> None:
        if sf.path is not None and self.files.get(sf.path) is sf:
            del self.files[sf.path]
        sf.path = None
        self.break_upload(sf)
        self.retire_if_idle(sf)

    def opened(self, sf: SpoolFile) -> None:
        sf.handles += 1

    def released(self, sf: SpoolFile) -> None:
        sf.handles -= 1
        self.retire_if_idle(sf)

    def retire_if_idle(self, sf: SpoolFile) -> None:
        """Let go of a file whose bytes are home and that nobody has open.

        Its content is on the client (and in the content store), so later opens read
        it from there; a long-lived session thus does not keep every output it ever
        wrote on the remote disk until it ends. A new output refused after a failed
        write stays, empty: the client has no file of that name, the kernel still
        knows it, and the job may write it again.
        """
        busy = sf.handles or sf.writers or sf.dirty or sf.upload is not None
        refused_new = sf.error is not None and sf.expect is None and sf.path is not None
        if busy or refused_new or sf.lock.locked() or sf.fd < 0:
            return
        if sf.path is not None:
            if self.files.get(sf.path) is sf:
                del self.files[sf.path]
            sf.path = None
        os.close(sf.fd)
        sf.fd = -1

    def move(self, old: bytes, new: bytes) -> None:
        """Rename a path or directory prefix in the spool (the client already did).

        An upload survives its directory's rename (its temporary file on the client
        moved along, and its end names the new path); a file renamed itself is sent
        whole at its close instead.
        """
        prefix = old + b"/"
        for path in list(self.files):
            if path == old or path.startswith(prefix):
                sf = self.files.pop(path)
                if path == old:
                    self.break_upload(sf)
                sf.path = new + path[len(old) :]
                if sf.committed_path is not None and (
                    sf.committed_path == old or sf.committed_path.startswith(prefix)
                ):
                    sf.committed_path = new + sf.committed_path[len(old) :]
                self.files[sf.path] = sf

    @asynccontextmanager
    async def names_held(self, *paths: bytes) -> AsyncIterator[None]:
        """Hold the names of the spool files at or below ``paths`` (for a rename).

        Waits for the commit requests naming them that are in flight; those sent
        after this is released name the files where the rename put them.
        """
        held: set[int] = set()
        async with AsyncExitStack() as stack:
            while True:  # again: a file may have been created below while we waited
                found = {
                    sf.serial: sf
                    for path, sf in self.files.items()
                    for top in paths
                    if (path == top or path.startswith(top + b"/")) and sf.serial not in held
                }
                if not found:
                    break
                for serial in sorted(found):  # one order for all: renames never deadlock
                    await stack.enter_async_context(found[serial].naming)
                    held.add(serial)
            yield

    # --- what the job writes ---------------------------------------------------------

    def write(self, sf: SpoolFile, offset: int, data: bytes) -> int:
        """Write all of ``data``; a failure sticks to the file (see the module's doc)."""
        done = 0
        try:
            while done < len(data):
                done += hostos.pwrite(sf.fd, data[done:], offset + done)
        except OSError as e:
            self.failed(sf, e)
            raise
        finally:
            if done:
                sf.dirty = True
                self.wrote(sf, offset, done)
        return done

    def failed(self, sf: SpoolFile, error: OSError) -> None:
        """The spool copy lost a write: it must not be committed (the first error counts)."""
        if sf.error is None:
            sf.error = error
            log.error("writing %r on the remote failed: %s", sf.path, error)
        sf.dirty = True  # so its commit runs, and reports it

    def truncate(self, sf: SpoolFile, size: int) -> None:
        self.break_upload(sf)
        os.ftruncate(sf.fd, size)
        sf.dirty = True
        if size == 0:
            sf.error = None  # every byte a failed write touched is gone
            sf.front = WrittenFront()

    # --- uploads that follow the writer --------------------------------------------

    def wrote(self, sf: SpoolFile, offset: int, length: int) -> None:
        """Called after each write: feed (or break, or start) the file's upload."""
        if sf.streamable and not sf.front.add(offset, length):
            self.break_upload(sf)
        up = sf.upload
        if up is not None:
            if offset < up.sent:
                self.break_upload(sf)
            up.more.set()
        elif sf.streamable and sf.path is not None and sf.front.end >= STREAM_AFTER:
            sf.upload = Upload(next(self._ids), sf.path)
            self.nursery.start_soon(self._follow, sf, sf.upload)

    def break_upload(self, sf: SpoolFile) -> None:
        sf.streamable = False
        if sf.upload is not None:
            sf.upload.broken = True
            sf.upload.more.set()

    async def _follow(self, sf: SpoolFile, up: Upload) -> None:
        try:
            async with sf.naming:
                if sf.path is None or up.broken:
                    return
                up.path = sf.path
                begin = proto.CommitBegin(up.cid, up.path, sf.mode, sf.expect, sf.check)
                await self.link.call(begin, proto.PRIO_BULK)
                up.begun = True
            while not up.broken:
                up.more = trio.Event()
                await self._send_available(sf, up, sf.front.end)
                if up.closing or up.broken:
                    break
                await up.more.wait()
        except OSError as e:
            log.info("upload of %r stopped: %s", up.path, e)
            up.broken = True
        finally:
            up.stopped.set()

    async def _send_available(self, sf: SpoolFile, up: Upload, upto: int | None = None) -> None:
        """Send from where ``up`` is to ``upto`` (the file's end if None)."""
        size = os.fstat(sf.fd).st_size
        if upto is not None:
            size = min(size, upto)
        while up.sent < size and not up.broken:
            data = hostos.pread(sf.fd, min(proto.CHUNK_SIZE, size - up.sent), up.sent)
            if not data:
                break
            offset = up.sent
            up.hasher.update(data)
            up.sent += len(data)  # before the await: a write behind this point breaks it
            await self.link.notify(proto.CommitChunk(up.cid, offset, data), proto.PRIO_BULK)

    async def _take_upload(self, sf: SpoolFile) -> Upload | None:
        """At commit time: the upload that followed the writer, if it is still good."""
        up, sf.upload = sf.upload, None
        if up is None:
            return None
        up.closing = True
        up.more.set()
        await up.stopped.wait()
        if up.broken or not up.begun:
            if up.begun:
                await self._abort(up.cid)
            return None
        return up

    # --- commits --------------------------------------------------------------------

    def writer_closed(self, sf: SpoolFile) -> None:
        sf.writers -= 1
        if sf.writers <= 0:
            sf.writers = 0
            if sf.dirty:
                self.schedule(sf)

    def schedule(self, sf: SpoolFile) -> None:
        if self.frozen:
            return
        owner = sf.owner
        self._pending[owner] = self._pending.get(owner, 0) + 1
        self.nursery.start_soon(self._commit_task, sf, owner)

    def pending(self, owner: int | None = None, *, everyone: bool = True) -> int:
        """Commits in flight: all of them, or (``everyone=False``) one owner's."""
        if everyone:
            return sum(self._pending.values())
        return self._pending.get(owner, 0)

    async def wait_idle(self, owner: int | None = None, *, everyone: bool = True) -> None:
        while self.pending(owner, everyone=everyone):
            await self._changed.wait()

    def dirty_files(self) -> list[SpoolFile]:
        return [sf for sf in self.files.values() if sf.dirty]

    def take_reports(
        self, owner: int | None, *, everyone: bool = True
    ) -> tuple[list[str], list[str]]:
        """(lost, notes) of one owner (and of no owner), removed from the lists."""

        def take(items: list[tuple[int | None, str]]) -> list[str]:
            mine = [t for o, t in items if everyone or o in (owner, None)]
            items[:] = [(o, t) for o, t in items if not (everyone or o in (owner, None))]
            return mine

        return take(self.lost), take(self.notes)

    async def _commit_task(self, sf: SpoolFile, owner: int | None) -> None:
        try:
            async with sf.lock:
                if sf.path is None:
                    sf.dirty = False  # unlinked meanwhile: nothing to send
                elif sf.dirty and sf.error is not None:
                    await self._refuse(sf)
                elif sf.dirty:
                    await self._commit_or_keep(sf)
            self.retire_if_idle(sf)
        finally:
            self._pending[owner] -= 1
            if not self._pending[owner]:
                del self._pending[owner]
            self._changed.set()
            self._changed = trio.Event()

    async def _commit_or_keep(self, sf: SpoolFile) -> None:
        """Commit; a new client taking the session over meanwhile (``attach``) gets the
        whole file again under a new id (the old client's half is gone with it, and a
        copy it finished is recognized by its content: fileserver._destination)."""
        for _ in range(MAX_RESENDS + 1):  # +1: a borrowed file that changed, from a copy
            epoch = self.link.epoch
            try:
                await self._commit(sf)
                return
            except SourceChanged:
                if not await self._own_copy(sf):
                    self._keep(sf, OSError(errno.EBUSY, "it kept changing while it was sent"))
                    return
                log.info("%r changed while it was sent: sending a private copy", sf.path)
                continue
            except OSError as e:
                if not await self.link.superseded_since(epoch):
                    self._keep(sf, e)
                    return
                log.info("commit of %r cut off by a new client: sending it again", sf.path)
        self._keep(sf, OSError(errno.EIO, "the session was taken over again and again"))

    async def _commit(self, sf: SpoolFile) -> None:
        """Send the file home; it lands where it is when the commit ends (see renames)."""
        sf.dirty = False
        up = await self._take_upload(sf)
        if up is None:
            async with sf.naming:
                if sf.path is None:
                    return  # unlinked while its upload was stopped: nothing to send
                up = Upload(next(self._ids), sf.path)
                await self.link.call(
                    proto.CommitBegin(up.cid, up.path, sf.mode, sf.expect, sf.check)
                )
                up.begun = True
        cid = up.cid
        sf.streamable = False
        try:
            await self._send_available(sf, up)
            offset = up.sent
            async with sf.naming:
                path = sf.path
                if sf.borrowed is not None and identity(os.fstat(sf.fd)) != sf.borrowed:
                    raise SourceChanged()  # what was sent may mix two versions
                if path is not None:
                    end = proto.CommitEnd(cid, offset, up.hasher.digest(), sf.mtime_ns, path)
                    res = await self.link.call(end, proto.PRIO_BULK, after_bulk=True)
                    sf.committed_path = res.path
        except BaseException:
            sf.dirty = True
            await self._abort(cid)
            raise
        if path is None:  # unlinked, or replaced by a rename, meanwhile: it must not land
            await self._abort(cid)
            return
        self.bytes_committed += offset
        refused = self._refused.pop(path, None)
        if refused in self.lost:
            self.lost.remove(refused)  # written again since, and home now
        if self.on_committed is not None:
            self.on_committed(sf, up.hasher.digest(), offset)
        if res.path != path:
            note = (
                f"{os.fsdecode(path)} changed on the client during the job; "
                f"the remote output was saved as {os.fsdecode(res.path)}"
            )
            self.notes.append((sf.owner, note))
        sf.expect = res.attr
        sf.check = True

    async def _own_copy(self, sf: SpoolFile) -> bool:
        """Replace a borrowed fd by a private copy taken while it did not change."""
        for _ in range(OWN_COPY_TRIES):
            fd = self._new_fd()
            try:
                before = identity(os.fstat(sf.fd))
                await trio.to_thread.run_sync(clone_or_copy, sf.fd, fd, before[1])
                if identity(os.fstat(sf.fd)) == before:
                    os.close(sf.fd)
                    sf.fd, sf.borrowed = fd, None
                    return True
            except OSError as e:
                log.info("could not copy %r: %s", sf.path, e)
            os.close(fd)
        return False

    async def _abort(self, cid: int) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self.link.call(proto.CommitAbort(cid))
            except OSError:
                pass

    async def _refuse(self, sf: SpoolFile) -> None:
        """A spool copy that lost a write is never committed: drop it and say so.

        Its room is given back at once (the job may free more and write it again): an
        adopted file is let go (later opens read the client's), a new one is emptied.
        """
        assert sf.path is not None and sf.error is not None
        self.break_upload(sf)
        await self._take_upload(sf)  # aborts an upload that had begun
        sf.dirty = False
        if sf.expect is None:
            os.ftruncate(sf.fd, 0)
        code = sf.error.errno or errno.EIO
        reason = _WHY.get(code, f"a write on the remote failed: {os.strerror(code)}")
        name = errno.errorcode.get(code, str(code))
        local = "the local file is unchanged" if sf.expect else "no local file was created"
        text = f"{os.fsdecode(sf.path)}: not committed: {reason} ({name}); {local}"
        self._refused[sf.path] = entry = (sf.owner, text)
        self.lost.append(entry)

    def _keep(self, sf: SpoolFile, error: OSError) -> None:
        """A failed commit: keep the bytes on the remote and say where."""
        assert sf.path is not None
        reason = error.strerror or str(error)
        try:
            dest = self.kept.keep(
                sf.path,
                sf.fd,
                complete=not sf.partial and sf.error is None,
                mode=sf.mode,
                expect=sf.expect,
                reason=reason,
            )
            where = f"kept on the remote host at {dest}"
            if sf.partial:
                where += " (partial: it was still being written)"
            elif sf.error is not None:
                where += " (partial: a write to it failed)"
        except OSError as e2:
            where = f"could not be kept either ({e2.strerror})"
        text = f"{os.fsdecode(sf.path)}: not written on the client ({reason}); {where}"
        self.lost.append((sf.owner, text))
        log.error("commit of %r failed: %s", sf.path, error)

    async def commit_kept(
        self, path: bytes, fd: int, mode: int, expect: proto.Attr | None
    ) -> bytes:
        """Commit a kept output (``kept.recover``) as any other; returns where it landed.
        ``fd`` stays the caller's."""
        sf = SpoolFile(path, os.dup(fd), mode, expect)
        try:
            async with sf.lock:
                await self._commit(sf)
        finally:
            os.close(sf.fd)
        assert sf.committed_path is not None
        return sf.committed_path

    def mark_open_partial(self) -> None:
        """The session ends: files a writer still has open are not whole outputs."""
        for sf in self.files.values():
            if sf.writers:
                sf.partial = True

    async def keep_uncommitted(self, why: str) -> tuple[int, int]:
        """At an abnormal end: everything not yet committed goes to ``kept/``.

        Returns how many files and bytes did not reach the client."""
        files = size = 0
        for sf in list(self.files.values()):
            if sf.dirty and sf.path is not None:
                files += 1
                size += os.fstat(sf.fd).st_size
                self._keep(sf, OSError(errno.EIO, why))
                sf.dirty = False
        return files, size

    def close(self) -> None:
        for sf in self.files.values():
            if sf.fd >= 0:
                os.close(sf.fd)
                sf.fd = -1
        self.files.clear()


_WHY = {
    errno.ENOSPC: "the remote disk is full",
    errno.EDQUOT: "the remote disk quota is exceeded",
    errno.EIO: "the remote disk failed to write it",
}


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
