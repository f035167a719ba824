"""The client's side of the mount: answers the agent's file requests inside the jail.

Reads hand out chunks of files opened once per transfer. Outputs arrive as a commit:
the data goes into a hidden temporary file beside the destination, then size and
blake3 hash are checked, the file is fsynced and renamed into place, and the
directory is fsynced, so a reader never sees half an output and a crash never leaves
a damaged one. Temporary files of unfinished commits are removed when the session ends;
named ones a killed client left are collected by a later commit into their directory.

Every request passes the write policy first (policy.py): hidden paths do not exist for
the agent, protected ones refuse every change, and each refusal is recorded for the
summary the user sees when the job ends.

The agent may be hostile, so what it can make us hold is capped: commit data in flight
across the session (a share of the free disk, see DISK_SHARE; a commit past it fails with
ENOSPC and its temporary file goes at once), and open reads and commits (from the fd
limit, which the client raises to its hard limit, so listings always have fds left).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import trio

from ..policy import Policy, PolicyOptions, Refusal, RefusalLog, safe_mode
from ..wire import proto
from .hashindex import QUICK_HASH_LIMIT, HashIndex
from .jail import Jail, JailError, split_path
from .osapi import OS

log = logging.getLogger(__name__)

MAX_OPEN_READS = 1024
MAX_OPEN_COMMITS = 256
MAX_RENAME_SCAN = 100_000  # entries of a renamed directory checked against the policy
MAX_MADE = 65536  # paths remembered as the agent's own changes (for the watcher)
# Descriptors kept back from both caps: listings, the jail's own, sockets, pipes, logs.
FD_RESERVE = 64
FD_CEILING = 65536  # the soft limit raised no higher (macOS refuses an unlimited one)

# Commit data in flight (written to temporary files, not yet renamed into place) may use
# this share of the space free without it, and never the filesystem's last
# DISK_RESERVE_FRACTION (at most DISK_RESERVE_MAX): a hostile agent cannot fill the disk.
DISK_SHARE = 0.75
DISK_RESERVE_FRACTION = 0.05
DISK_RESERVE_MAX = 1 << 30
TEMP_MARK = b".tmcommit-"
# A commit's data is sent to the disk every FLUSH_AHEAD bytes as it arrives (osapi's
# start_flush), not all at its end's fsync (1 GiB took seconds there).
FLUSH_AHEAD = 8 << 20

# Chunk data is written to the commit's file at most this much per write(): on the test
# VM, 1 GiB written 1 MiB a call took 4-5 times the kernel time of 256 KiB a call
# (0.85 s against 0.17 s, quiet; large page-cache folios came from memory the
# hypervisor must fault in again); elsewhere it costs nothing measurable.
WRITE_PIECE = 256 << 10
THREAD_WRITE_MIN = 256 << 10  # chunks from this size are written in a thread

# A listing the agent asks with room for it (ListDir.inline: the job's own readdir, a
# walk's next directory) carries the content of small files the client has not hashed
# yet (see _inline), so a job that reads a directory of them needs no round trip per
# file: files up to INLINE_FILE_MAX, at most INLINE_LISTING_MAX bytes (whatever the
# agent asks) and INLINE_FILES_MAX files a listing. A file the index knows goes by its
# hash alone (the agent's store keeps what listings carried).
INLINE_FILE_MAX = 64 << 10
INLINE_LISTING_MAX = 1 << 20
INLINE_FILES_MAX = 512
_TMPFILE_NAME = re.compile(rb"#\d+")
# A named commit temporary (``.<name>.tmcommit-<12 hex>``) untouched for this long is a
# killed client's leftover, not a live commit of another session: collected (see
# _collect_leftovers). A live commit's writes keep its mtime fresh.
LEFTOVER_AGE = 600.0
_LEFTOVER_NAME = re.compile(rb"\..+" + re.escape(TEMP_MARK) + rb"[0-9a-f]{12}", re.DOTALL)


def attr_of(st: os.stat_result) -> proto.Attr:
    return proto.Attr(st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns)


@dataclass
class _Commit:
    path: bytes
    dir_fd: int  # walking fd of the temp file's directory: follows it if it is renamed
    temp_name: bytes  # b"" while the temp file has no name (O_TMPFILE)
    fd: int
    mode: int
    expect: proto.Attr | None
    check: bool
    name_when_done: bytes = b""  # the name an O_TMPFILE gets once its content is verified
    hasher: blake3.blake3 = field(default_factory=blake3.blake3)
    written: int = 0
    flushed: int = 0  # written bytes already on their way to the disk
    writing: bool = False  # a thread is writing a chunk into fd (receive_chunk)
    abandoned: bool = False  # aborted meanwhile: closed once that write returns
    error: OSError | None = None


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (at most FD_CEILING); the
    resulting soft limit. Many inputs open at once must not run listings out of fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_CEILING)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (OSError, ValueError):
            pass
    return FD_CEILING if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class OpenCaps:
    """How many reads and commits may be open at once, from the fd limit."""

    reads: int
    commits: int

    @classmethod
    def for_limit(cls, fd_limit: int) -> OpenCaps:
        # A commit holds two fds (file and directory), a read up to two (file and its
        # hashing copy); FD_RESERVE is left for everything else.
        spare = max(fd_limit - FD_RESERVE, 8)
        commits = max(1, min(MAX_OPEN_COMMITS, spare // 8))
        reads = max(1, min(MAX_OPEN_READS, (spare - 2 * commits) // 2))
        return cls(reads, commits)


@dataclass
class _Read:
    fd: int
    st: os.stat_result


@dataclass
class TransferStats:
    """Counters kept where the bytes move, for ``--stats`` and the benchmarks."""

    bytes_read: int = 0  # content sent: chunks, and small files inline in listings
    files_opened: int = 0
    files_inlined: int = 0
    bytes_committed: int = 0
    files_committed: int = 0
    # What the jobs' manifests announced, and the part the remote cache already had
    # (set by the session; the progress display's "expected" and "skipped" bytes).
    manifest_bytes: int = 0
    manifest_cached_bytes: int = 0


@dataclass
class _InlineBudget:
    """What one listing may still carry inline."""

    limit: int
    used: int = 0
    files: int = 0

    def fits(self, size: int) -> bool:
        return (
            size <= INLINE_FILE_MAX
            and self.used + size <= self.limit
            and self.files < INLINE_FILES_MAX
        )

    def take(self, size: int) -> None:
        self.used += size
        self.files += 1


class FileServer:
    def __init__(
        self,
        root: Path,
        index: HashIndex | None = None,
        policy: Policy | None = None,
        disk_share: float = DISK_SHARE,
    ) -> None:
        self.caps = OpenCaps.for_limit(raise_fd_limit())
        self.disk_share = disk_share
        self.jail = Jail(root)
        self.policy = policy if policy is not None else Policy.from_options(PolicyOptions())
        self.refusals = RefusalLog()
        self.index = index if index is not None else HashIndex()
        self._reads: dict[int, _Read] = {}
        self._commits: dict[int, _Commit] = {}
        self._next_handle = 1
        self.stats = TransferStats()
        self.committed: list[bytes] = []
        # Set by the session: where a big input's hash is computed while it streams,
        # and how the agent hears of it (see _hash_while_streaming).
        self.background: trio.Nursery | None = None
        self.notify: Callable[[Any], Awaitable[None]] | None = None
        # What the agent's own requests left at each path (state, when), so the
        # watcher of a long-lived session can tell them from the user's changes.
        self.made: dict[bytes, tuple[tuple[int, int, int, int] | None, float]] = {}
        self._collected: set[bytes] = set()  # directories already rid of old leftovers

    def close(self) -> None:
        """Drop open files and every unfinished commit's temporary file."""
        for r in self._reads.values():
            os.close(r.fd)
        self._reads.clear()
        for cid in list(self._commits):
            self._abort(cid)
        self.jail.close()
        self.index.close()

    def commits_in_flight(self) -> list[bytes]:
        """Outputs begun and not yet committed (named when the connection is lost)."""
        return [c.path for c in self._commits.values()]

    def bytes_in_flight(self) -> int:
        """Output bytes received and not yet committed."""
        return sum(c.written for c in self._commits.values())

    # --- our own changes, for the watcher ----------------------------------------------

    def state_of(self, rel: bytes) -> tuple[int, int, int, int] | None:
        try:
            st = self.jail.lstat(rel)
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode):  # its mtime moves with our own commits into it
            return (st.st_ino, 0, 0, st.st_mode)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)

    def _made(self, *paths: bytes) -> None:
        now = time.monotonic()
        for rel in paths:
            self.made.pop(rel, None)  # re-inserted: the dict stays oldest first
            self.made[rel] = (self.state_of(rel), now)
        while len(self.made) > MAX_MADE:  # a flood of requests must not grow us
            del self.made[next(iter(self.made))]

    def is_echo(self, rel: bytes) -> bool:
        """Whether ``rel`` is as the agent's last request left it (not the user's change)."""
        if TEMP_MARK in rel:
            return True
        now = self.state_of(rel)
        if now is None and _TMPFILE_NAME.fullmatch(rel.rpartition(b"/")[2]):
            return True  # the kernel's name for an O_TMPFILE commit before it is linked
        record = self.made.get(rel)
        return record is not None and record[0] == now

    def forget_made(self, older_than: float = 60.0) -> None:
        cutoff = time.monotonic() - older_than
        for rel in [p for p, (_, when) in self.made.items() if when < cutoff]:
            del self.made[rel]

    # --- the write policy ------------------------------------------------------------

    def _visible(self, rel: bytes) -> None:
        """A hidden path does not exist, as far as the agent can tell."""
        split_path(rel)
        if self.policy.hidden(rel):
            raise OSError(errno.ENOENT, "no such file or directory")

    def _writable(self, rel: bytes, op: str, why: str | None = None) -> None:
        """Refuse (and record) ``op`` on ``rel`` if the policy forbids changing it
        (or ``why`` already says why not)."""
        split_path(rel)
        why = why or self.policy.write_refusal(rel)
        if why is not None:
            self.refusals.add(Refusal(rel, op, why))
            code = errno.EROFS if self.policy.read_only else errno.EACCES
            # The reason stays here (it could name a hidden path beneath a renamed one).
            raise OSError(code, f"{op} refused by the client's write policy")

    def _renamable(self, old: bytes, new: bytes) -> None:
        """A rename changes the path of everything beneath a directory too: moving a
        directory that holds ``.git`` (or one that would put ``LaunchAgents`` under
        ``Library``) is refused like a rename of the protected path itself."""
        self._writable(old, "rename")
        self._writable(new, "rename")
        try:
            is_dir = stat.S_ISDIR(self.jail.lstat(old).st_mode)
        except OSError:
            return  # the rename itself reports it
        if not is_dir:
            return
        pending, seen = [b""], 0
        while pending:
            sub = pending.pop()
            for name, st in self.jail.listdir(old + b"/" + sub if sub else old):
                below = sub + b"/" + name if sub else name
                seen += 1
                if seen > MAX_RENAME_SCAN:
                    self._writable(old, "rename", f"over {MAX_RENAME_SCAN} entries to check")
                for verb, path in (("move", old + b"/" + below), ("make", new + b"/" + below)):
                    why = self.policy.write_refusal(path)
                    if why is not None:
                        self._writable(old, "rename", f"would {verb} {os.fsdecode(path)}, {why}")
                if stat.S_ISDIR(st.st_mode):
                    pending.append(below)

    # --- dispatch -------------------------------------------------------------------

    async def handle(self, req: object) -> object:
        method: Any = _HANDLERS.get(type(req))  # type: ignore[call-overload]
        if method is None:
            raise OSError(errno.ENOSYS, f"the client does not serve {type(req).__name__}")
        return method(self, req)

    def handle_chunk(self, msg: proto.CommitChunk) -> None:
        """A commit's data, written and hashed here and now."""
        c = self._accept_chunk(msg)
        if c is None:
            return
        try:
            _write_and_hash(c.fd, c.hasher, msg.data)
        except OSError as e:
            self._chunk_failed(c, e)
            return
        self._chunk_written(c, len(msg.data))

    async def receive_chunk(self, msg: proto.CommitChunk) -> None:
        """As ``handle_chunk``, but a big chunk is written and hashed in a thread: the
        session reads the link on meanwhile (one thread did both in turn, and a 1 GiB
        output's writes took seconds of it). Chunks still land one after the other:
        the session hands over the next one only when this returns."""
        if len(msg.data) < THREAD_WRITE_MIN:
            self.handle_chunk(msg)
            return
        c = self._accept_chunk(msg)
        if c is None:
            return
        error = None
        c.writing = True
        try:
            await trio.to_thread.run_sync(_write_and_hash, c.fd, c.hasher, msg.data)
        except OSError as e:
            error = e
        finally:
            c.writing = False
            if c.abandoned:  # aborted while the thread wrote: its fds are ours to close
                self._dispose(c)
        if c.abandoned:
            return
        if error is not None:
            self._chunk_failed(c, error)
            return
        self._chunk_written(c, len(msg.data))

    def _accept_chunk(self, msg: proto.CommitChunk) -> _Commit | None:
        c = self._commits.get(msg.commit)
        if c is None or c.error is not None:
            return None
        try:
            if msg.offset != c.written:
                raise OSError(errno.EIO, "commit data out of order")
            self._check_room(c.fd, len(msg.data))
        except OSError as e:
            self._chunk_failed(c, e)
            return None
        return c

    def _chunk_failed(self, c: _Commit, error: OSError) -> None:
        """Failed for good (its end reports it): give the space back now."""
        c.error = error
        self._drop_temp(c)

    def _chunk_written(self, c: _Commit, size: int) -> None:
        c.written += size
        if c.written - c.flushed >= FLUSH_AHEAD:  # the end's fsync then waits for little
            OS.start_flush(c.fd, c.flushed, c.written - c.flushed)
            c.flushed = c.written

    def _collect_leftovers(self, parent: bytes, dir_fd: int) -> None:
        """Remove what killed clients' commits left in the directory ``parent`` (where
        temporary files are named: off Linux, or a file system without O_TMPFILE).
        Once per directory per session, on the first commit into it: only directories
        we write to are listed, and a leftover stays hidden from the job meanwhile."""
        if parent in self._collected or len(self._collected) >= MAX_MADE:
            return
        self._collected.add(parent)
        ours = {c.temp_name for c in self._commits.values()}
        cutoff = time.time() - LEFTOVER_AGE
        try:
            entries = self.jail.listdir(parent)
        except OSError:
            return  # renamed or unreadable meanwhile: collecting is best effort
        for name, st in entries:
            if (
                TEMP_MARK in name
                and name not in ours
                and _LEFTOVER_NAME.fullmatch(name)
                and stat.S_ISREG(st.st_mode)
                and st.st_mtime < cutoff
            ):
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except OSError:
                    continue
                log.info("removed %r, left by an interrupted commit", name)

    def commit_bytes_in_flight(self) -> int:
        """Data of every unfinished commit of the session, on the client's disk."""
        return sum(c.written for c in self._commits.values() if c.fd >= 0)

    def _check_room(self, fd: int, more: int) -> None:
        """ENOSPC if ``more`` bytes of commit data would pass the disk cap (see DISK_SHARE)."""
        st = os.fstatvfs(fd)
        in_flight = self.commit_bytes_in_flight()
        free_without = st.f_bavail * st.f_frsize + in_flight
        reserve = min(DISK_RESERVE_MAX, int(st.f_blocks * st.f_frsize * DISK_RESERVE_FRACTION))
        cap = min(int(free_without * self.disk_share), free_without - reserve)
        if in_flight + more > cap:
            raise OSError(
                errno.ENOSPC,
                f"outputs in flight would pass the client's disk cap ({max(cap, 0) >> 20} MiB)",
            )

    def _drop_temp(self, c: _Commit) -> None:
        """Close and remove a failed commit's temporary file; its entry stays for its end."""
        if c.fd >= 0:
            os.close(c.fd)
            c.fd = -1
        if c.temp_name:
            try:
                os.unlink(c.temp_name, dir_fd=c.dir_fd)
            except OSError:
                pass
            c.temp_name = b""

    # --- requests -------------------------------------------------------------------

    def directory_attrs(self, rel: bytes) -> list[proto.KnownDir]:
        """The root and each directory down to ``rel`` (root-relative), as Stat would
        answer them; a Run carries them (``Run.dirs``). Stops at the first it refuses."""
        found: list[proto.KnownDir] = []
        parts = rel.split(b"/") if rel else []
        for depth in range(len(parts) + 1):
            path = b"/".join(parts[:depth])
            try:
                found.append(proto.KnownDir(path, self._stat(proto.Stat(path)).attr))
            except OSError:
                break
        return found

    def _stat(self, req: proto.Stat) -> proto.AttrReply:
        self._visible(req.path)
        return proto.AttrReply(attr_of(self.jail.lstat(req.path)))

    def _listdir(self, req: proto.ListDir) -> proto.Listing:
        self._visible(req.path)
        prefix = req.path + b"/" if req.path else b""
        entries = []
        inline = _InlineBudget(limit=min(max(req.inline, 0), INLINE_LISTING_MAX))
        learned: list[tuple[os.stat_result, bytes]] = []
        for name, st in sorted(self.jail.listdir(req.path)):
            if TEMP_MARK in name or self.policy.hidden(prefix + name):
                continue
            digest = data = None
            if stat.S_ISREG(st.st_mode):
                digest = self.index.lookup(st)
                if digest is None and inline.fits(st.st_size):
                    data = self._inline(prefix + name, st)
                    if data is not None:
                        inline.take(len(data))
                        digest = blake3.blake3(data).digest()
                        learned.append((st, digest))
            entries.append(proto.DirEntry(name, attr_of(st), digest, data))
        self.index.remember_many(learned)  # the next listing sends their hashes alone
        self.stats.files_inlined += len(learned)
        self.stats.bytes_read += inline.used
        return proto.Listing(entries)

    def _inline(self, rel: bytes, listed: os.stat_result) -> bytes | None:
        """The whole content of a small file, if it is still what ``listed`` says."""
        try:
            fd = self.jail.open_read(rel)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
                listed.st_ino, listed.st_size, listed.st_mtime_ns, listed.st_ctime_ns
            ):
                return None
            data = os.pread(fd, st.st_size + 1, 0)
            if len(data) != st.st_size or os.fstat(fd).st_ctime_ns != st.st_ctime_ns:
                return None  # changed while we read it
            return data
        except OSError:
            return None
        finally:
            os.close(fd)

    def _open_read(self, req: proto.OpenRead) -> proto.Opened:
        if len(self._reads) >= self.caps.reads:
            raise OSError(errno.EMFILE, "too many open files")
        self._visible(req.path)
        fd = self.jail.open_read(req.path)
        st = os.fstat(fd)
        handle = self._next_handle
        self._next_handle += 1
        self._reads[handle] = _Read(fd, st)
        digest = self.index.lookup(st)
        if digest is None:
            if st.st_size > QUICK_HASH_LIMIT and self.background is not None:
                self.background.start_soon(self._hash_while_streaming, handle, os.dup(fd))
            else:
                digest = self.index.hash_of(fd)
        self.stats.files_opened += 1
        return proto.Opened(handle, attr_of(st), digest)

    async def _hash_while_streaming(self, handle: int, fd: int) -> None:
        """A big input we had not hashed starts streaming at once (the job must not
        wait); meanwhile we hash it, and if the agent's store turns out to have that
        content, it stops the transfer and uses its copy."""
        try:
            digest = await trio.to_thread.run_sync(self.index.hash_of, fd)
        except OSError:
            return
        finally:
            os.close(fd)
        if self.notify is not None and handle in self._reads:
            try:
                await self.notify(proto.Hashed(handle, digest))
            except Exception:  # the connection went away; nothing to tell
                pass

    def manifest(self, paths: list[bytes], budget: int) -> list[proto.ManifestEntry]:
        """The inputs' sizes, mtimes and hashes; unknown hashes computed within ``budget``."""
        entries = []
        for rel in paths:
            try:
                self._visible(rel)
                fd = self.jail.open_read(rel)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                digest = self.index.lookup(st)
                if digest is None and st.st_size <= budget:
                    digest = self.index.hash_of(fd)
                    budget -= st.st_size
            finally:
                os.close(fd)
            entries.append(proto.ManifestEntry(rel, st.st_size, st.st_mtime_ns, digest))
        return entries

    def _read_chunk(self, req: proto.ReadChunk) -> proto.Data:
        r = self._reads.get(req.handle)
        if r is None:
            raise OSError(errno.EBADF, "unknown read handle")
        if req.length < 0 or req.length > proto.CHUNK_SIZE * 4 or req.offset < 0:
            raise OSError(errno.EINVAL, "bad read range")
        data = os.pread(r.fd, req.length, req.offset)
        st = os.fstat(r.fd)
        if (st.st_size, st.st_mtime_ns) != (r.st.st_size, r.st.st_mtime_ns):
            # Changed in place while being sent: fail the read rather than hand the
            # job a file that mixes two versions. A later open sees the new one.
            raise OSError(errno.ESTALE, "the file changed on the client while being read")
        self.stats.bytes_read += len(data)
        return proto.Data(data)

    def _close_read(self, req: proto.CloseRead) -> proto.Done:
        r = self._reads.pop(req.handle, None)
        if r is not None:
            os.close(r.fd)
        return proto.Done()

    def _mkdir(self, req: proto.Mkdir) -> proto.AttrReply:
        self._writable(req.path, "mkdir")
        self.jail.mkdir(req.path, req.mode)
        self._made(req.path)
        return self._stat(proto.Stat(req.path))

    def _rmdir(self, req: proto.Rmdir) -> proto.Done:
        self._writable(req.path, "rmdir")
        self.jail.rmdir(req.path)
        self._made(req.path)
        return proto.Done()

    def _unlink(self, req: proto.Unlink) -> proto.Done:
        self._writable(req.path, "delete")
        self.jail.unlink(req.path)
        self._made(req.path)
        return proto.Done()

    def _rename(self, req: proto.Rename) -> proto.Done:
        self._renamable(req.old, req.new)
        self.jail.rename(req.old, req.new, req.noreplace)
        self._made(req.old, req.new)
        return proto.Done()

    def _setattr(self, req: proto.SetAttr) -> proto.AttrReply:
        if req.mode is not None:
            self._writable(req.path, "chmod")
        if req.atime_ns is not None or req.mtime_ns is not None:
            self._writable(req.path, "utime")
        if req.mode is not None:
            self.jail.chmod(req.path, req.mode)
        if req.atime_ns is not None or req.mtime_ns is not None:
            self.jail.utime(req.path, req.atime_ns, req.mtime_ns)
        self._made(req.path)
        return self._stat(proto.Stat(req.path))

    def _statfs(self, req: proto.StatFs) -> proto.FsStats:
        s = self.jail.statvfs()
        return proto.FsStats(
            s.f_bsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_namemax
        )

    def _readlink(self, req: proto.ReadLink) -> proto.LinkTarget:
        self._visible(req.path)
        return proto.LinkTarget(self.jail.readlink(req.path))

    def _symlink(self, req: proto.Symlink) -> proto.AttrReply:
        self._writable(req.path, "symlink", self.policy.symlink_refusal(req.path, req.target))
        self.jail.symlink(req.path, req.target)
        self._made(req.path)
        return self._stat(proto.Stat(req.path))

    # --- commits --------------------------------------------------------------------

    def _commit_begin(self, req: proto.CommitBegin) -> proto.Done:
        if len(self._commits) >= self.caps.commits:
            raise OSError(errno.EMFILE, "too many outputs in flight")
        if req.commit in self._commits:
            raise OSError(errno.EEXIST, "commit id in use")
        self._writable(req.path, "write")
        parts = split_path(req.path)
        if not parts:
            raise JailError(errno.EPERM, "cannot write the root")
        name = parts[-1]
        temp_name = b"." + name[:180] + TEMP_MARK + secrets.token_hex(6).encode()
        with self.jail.parent(req.path) as (dfd, _):
            self._check_room(dfd, 1)  # refused at once when the cap is reached
            self._collect_leftovers(req.path.rpartition(b"/")[0], dfd)
            fd, named = OS.create_temp(dfd, temp_name)
            unnamed = b"" if named else temp_name
            if not named:
                temp_name = b""
            dir_fd = os.dup(dfd)
        self._commits[req.commit] = _Commit(
            req.path, dir_fd, temp_name, fd, safe_mode(req.mode), req.expect, req.check, unnamed
        )
        return proto.Done()

    def _commit_end(self, req: proto.CommitEnd) -> proto.Committed:
        c = self._commits.get(req.commit)
        if c is None:
            raise OSError(errno.EBADF, "unknown commit")
        try:
            if req.path is not None:  # the job renamed it (or its directory) meanwhile
                if not split_path(req.path):
                    raise JailError(errno.EPERM, "cannot write the root")
                c.path = req.path
            # Checked again, at the path it lands at: a hostile agent could begin at an
            # allowed path and end at a protected one.
            self._writable(c.path, "write")
            if c.error is not None:
                raise c.error
            if c.written != req.size:
                raise OSError(errno.EIO, f"size mismatch: got {c.written}, sent {req.size}")
            if c.hasher.digest() != req.blake3:
                raise OSError(errno.EIO, "content hash mismatch")
            os.fchmod(c.fd, c.mode & 0o7777)
            if req.mtime_ns is not None:
                os.utime(c.fd, ns=(req.mtime_ns, req.mtime_ns))
            OS.flush(c.fd)
            if c.name_when_done:
                OS.link_temp(c.fd, c.name_when_done, c.dir_fd)
                c.temp_name = c.name_when_done
            os.close(c.fd)
            c.fd = -1
            if self._landed_already(c, req.blake3):
                self._abort(req.commit)
                st = self.jail.lstat(c.path)
                return proto.Committed(c.path, attr_of(st))
            dest = self._destination(c)
            self._writable(dest, "write")  # its conflict name, too
            with self.jail.parent(dest) as (dfd, dname):
                os.rename(c.temp_name, dname, src_dir_fd=c.dir_fd, dst_dir_fd=dfd)
                c.temp_name = b""
                _fsync_dir(dfd)
        except BaseException:
            self._abort(req.commit)
            raise
        del self._commits[req.commit]
        os.close(c.dir_fd)
        self.stats.bytes_committed += c.written
        self.stats.files_committed += 1
        self.committed.append(dest)
        self._made(dest)
        st = self.jail.lstat(dest)
        self.index.remember(st, req.blake3)  # verified above: a later run need not hash it
        return proto.Committed(dest, attr_of(st))

    def _landed_already(self, c: _Commit, digest: bytes) -> bool:
        """The destination already holds exactly these bytes, though not the file the
        agent expected: a client that died took this very commit home before a new one
        took the session over (``attach``), which sends it again. Landing it once more
        would make a conflict copy of itself."""
        if not c.check:
            return False
        try:
            st = self.jail.lstat(c.path)
        except OSError:
            return False
        expect = c.expect
        if not stat.S_ISREG(st.st_mode) or st.st_size != c.written or (
            expect is not None and (st.st_size, st.st_mtime_ns) == (expect.size, expect.mtime_ns)
        ):
            return False
        try:
            fd = self.jail.open_read(c.path)
        except OSError:
            return False
        try:
            return self.index.hash_of(fd) == digest
        finally:
            os.close(fd)

    def _destination(self, c: _Commit) -> bytes:
        """The commit's path, or a sibling if the local file changed behind our back."""
        if not c.check:
            return c.path
        try:
            now: proto.Attr | None = attr_of(self.jail.lstat(c.path))
        except FileNotFoundError:
            now = None
        same = (now is None and c.expect is None) or (
            now is not None
            and c.expect is not None
            and (now.size, now.mtime_ns) == (c.expect.size, c.expect.mtime_ns)
        )
        if same:
            return c.path
        head, _, name = c.path.rpartition(b"/")
        stem, dot, ext = name.rpartition(b".")
        if not stem:
            stem, dot, ext = name, b"", b""
        mark = b".remote-conflict"
        stem = stem[: max(1, 255 - len(mark) - len(dot) - len(ext))]
        alt = stem + mark + dot + ext
        log.warning("%s changed locally during the job; remote output kept as %s", c.path, alt)
        return (head + b"/" if head else b"") + alt

    def _commit_abort(self, req: proto.CommitAbort) -> proto.Done:
        self._abort(req.commit)
        return proto.Done()

    def _abort(self, cid: int) -> None:
        c = self._commits.pop(cid, None)
        if c is None:
            return
        if c.writing:
            c.abandoned = True  # a thread writes into its fd: receive_chunk closes it
            return
        self._dispose(c)

    def _dispose(self, c: _Commit) -> None:
        if c.fd >= 0:
            os.close(c.fd)
        if c.temp_name:
            try:
                os.unlink(c.temp_name, dir_fd=c.dir_fd)
            except OSError:
                pass
        os.close(c.dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    """In pieces of at most WRITE_PIECE (see there)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:WRITE_PIECE])
        view = view[n:]


def _write_and_hash(fd: int, hasher: blake3.blake3, data: bytes) -> None:
    _write_all(fd, data)
    hasher.update(data)


def _fsync_dir(dir_path_fd: int) -> None:
    fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_path_fd)
    try:
        OS.flush(fd)  # the rename itself reaches the disk (on macOS: F_FULLFSYNC)
    finally:
        os.close(fd)


_HANDLERS = {
    proto.Stat: FileServer._stat,
    proto.ListDir: FileServer._listdir,
    proto.OpenRead: FileServer._open_read,
    proto.ReadChunk: FileServer._read_chunk,
    proto.CloseRead: FileServer._close_read,
    proto.Mkdir: FileServer._mkdir,
    proto.Rmdir: FileServer._rmdir,
    proto.Unlink: FileServer._unlink,
    proto.Rename: FileServer._rename,
    proto.SetAttr: FileServer._setattr,
    proto.StatFs: FileServer._statfs,
    proto.ReadLink: FileServer._readlink,
    proto.Symlink: FileServer._symlink,
    proto.CommitBegin: FileServer._commit_begin,
    proto.CommitEnd: FileServer._commit_end,
    proto.CommitAbort: FileServer._commit_abort,
}
