"""pyfuse3 adapter: kernel requests in, read cache / spool / client calls out.

This module only translates. Inode bookkeeping lives in ``Inodes``; file contents come
from ``ReadCache`` (client files) or ``Spool`` (what the job wrote); everything else is
one call to the client. Every handler turns every failure into an errno, because one
exception escaping a handler ends ``pyfuse3.main`` and with it the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ..policy import MAX_REFUSALS_KEPT, Policy
from ..wire import proto
from . import listings, nudge
from .follow import Ahead, Follower
from .link import ClientLink
from .listings import Listings
from .readcache import CachedFile, ReadCache
from .spool import Spool, SpoolFile

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE

# Small files' content a listing the job goes through may carry (the client caps it):
# 1 MiB is 40 ms of a 200 Mbit/s link, paid once per file (the next listing of an
# unchanged file sends its hash), against a round trip for each file it saves.
LISTING_INLINE = 1 << 20


def _errno_of(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO


def handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure becomes a FUSEError; nothing else may leave a handler."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(_errno_of(e)) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class Node:
    ino: int
    path: bytes | None
    lookups: int = 0


class Inodes:
    """Inode numbers for root-relative paths; entries live while the kernel knows them."""

    def __init__(self) -> None:
        self._by_ino: dict[int, Node] = {ROOT: Node(ROOT, b"", 1)}
        self._by_path: dict[bytes, int] = {b"": ROOT}
        self._next = ROOT + 1

    def path(self, ino: int) -> bytes:
        node = self._by_ino.get(ino)
        if node is None or node.path is None:
            raise OSError(errno.ENOENT, "stale inode")
        return node.path

    def ino(self, path: bytes) -> int:
        ino = self._by_path.get(path)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_ino[ino] = Node(ino, path)
            self._by_path[path] = ino
        return ino

    def known(self, path: bytes) -> int | None:
        """The inode number the kernel may hold for ``path``, without making one."""
        return self._by_path.get(path)

    def looked_up(self, ino: int) -> None:
        self._by_ino[ino].lookups += 1

    def forget(self, ino: int, n: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= n
        if node.lookups <= 0:
            del self._by_ino[ino]
            if node.path is not None and self._by_path.get(node.path) == ino:
                del self._by_path[node.path]

    def drop(self, path: bytes) -> None:
        ino = self._by_path.pop(path, None)
        if ino is not None and ino in self._by_ino:
            self._by_ino[ino].path = None

    def move(self, old: bytes, new: bytes) -> None:
        self.drop(new)
        prefix = old + b"/"
        for path in [p for p in self._by_path if p == old or p.startswith(prefix)]:
            ino = self._by_path.pop(path)
            moved = new + path[len(old) :]
            self._by_ino[ino].path = moved
            self._by_path[moved] = ino


def _notify_kernel(items: list[tuple[int, bytes | None]]) -> None:
    """Drop the kernel's cached entries ((parent, name)) and attributes and pages (ino)."""
    for ino, name in items:
        try:
            if name is None:
                pyfuse3.invalidate_inode(ino, attr_only=False)
            else:
                pyfuse3.invalidate_entry(ino, name)
        except OSError as e:  # ENOENT: the kernel had already forgotten it
            if e.errno != errno.ENOENT:
                log.info("kernel invalidation of %d/%r failed: %s", ino, name, e)


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


@dataclass
class Handle:
    cached: CachedFile | None = None
    spool: SpoolFile | None = None
    writable: bool = False
    owner: int | None = None  # the job whose process opened it for writing


@dataclass
class DirHandle:
    path: bytes
    entries: list[tuple[bytes, proto.Attr]] | None = None


@dataclass
class FsStats:
    """Counters for the job's exit report and the benchmarks, and open writers by job."""

    opens: int = 0
    reads: int = 0
    writes: int = 0
    writers: dict[int | None, int] = field(default_factory=dict)
    writers_changed: trio.Event = field(default_factory=trio.Event)

    def open_writers(self, owner: int | None = None, *, everyone: bool = True) -> int:
        return sum(self.writers.values()) if everyone else self.writers.get(owner, 0)

    async def wait_writers_gone(self, owner: int | None = None, *, everyone: bool = True) -> None:
        while self.open_writers(owner, everyone=everyone):
            await self.writers_changed.wait()


class MountOps(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(
        self,
        client: ClientLink,
        cache: ReadCache,
        spool: Spool,
        *,
        timeout: float = 5.0,
        mountpoint: Path | None = None,
    ) -> None:
        super().__init__()
        self.mountpoint = mountpoint  # where we are mounted: see nudge.py
        self.client = client
        self.cache = cache
        self.spool = spool
        self.timeout = timeout
        self.inodes = Inodes()
        # The client's attributes as last seen (lookup, getattr, readdir): an open can
        # then find a prefetched file without another round trip to the client.
        self.known: dict[bytes, proto.Attr] = {}
        self.listings = Listings(timeout)
        # Which files the job will open next, learned from its listings and opens.
        self.follower = Follower()
        self.follower.named = cache.named
        # Directories' attributes as last seen, and when: the kernel drops a directory's
        # attributes whenever the job creates something in it, then asks again before
        # the next create (its permission check) - a round trip per output otherwise.
        self.dirs_seen: dict[bytes, tuple[float, proto.Attr]] = {}
        self._relisting: dict[bytes, trio.Event] = {}
        self._unlisted_lookups: dict[bytes, int] = {}  # see _list_instead
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        self.stats = FsStats()
        # Which job a process belongs to (set by the session; None: no job of ours).
        self.owner_of: Callable[[int], int | None] = lambda pid: None
        # The client's write policy (from Hello): creates and opens for writing never
        # reach the client before the commit, so they are refused here, at open.
        self.policy: Policy | None = None
        self.refused: list[tuple[int | None, proto.Refused]] = []

    # --- helpers --------------------------------------------------------------------

    def _check_write(self, path: bytes, op: str, ctx: Any) -> None:
        """EACCES (EROFS on a read-only root) if the client's policy forbids it."""
        why = None if self.policy is None else self.policy.write_refusal(path)
        if why is None:
            return
        if len(self.refused) < MAX_REFUSALS_KEPT:
            self.refused.append((self.owner_of(ctx.pid), proto.Refused(path, op, why)))
        assert self.policy is not None
        raise OSError(errno.EROFS if self.policy.read_only else errno.EACCES, why)

    def take_refused(self, owner: int | None, *, everyone: bool) -> list[proto.Refused]:
        """The refusals of one job (and of no job's processes), removed from the list."""
        mine = [r for o, r in self.refused if everyone or o in (owner, None)]
        self.refused = [(o, r) for o, r in self.refused if not (everyone or o in (owner, None))]
        return mine

    def entry(self, ino: int, attr: proto.Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = attr.mode
        e.st_nlink = 2 if stat.S_ISDIR(attr.mode) else 1
        e.st_uid = self.uid
        e.st_gid = self.gid
        e.st_rdev = 0
        e.st_size = attr.size
        e.st_blksize = 1 << 17
        e.st_blocks = (attr.size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    async def attr_of(self, path: bytes) -> proto.Attr:
        sf = self.spool.get(path)
        if sf is not None:
            return sf.attr()
        res = await self.client.call(proto.Stat(path), proto.PRIO_URGENT)
        self.known[path] = res.attr
        self._saw(path, res.attr)
        return res.attr

    def _saw(self, path: bytes, attr: proto.Attr) -> None:
        if stat.S_ISDIR(attr.mode):
            self.dirs_seen[path] = (time.monotonic(), attr)

    def known_directories(self, dirs: list[proto.KnownDir]) -> None:
        """Attributes the client sent with a command, as its Stat replies would be."""
        for d in dirs:
            if stat.S_ISDIR(d.attr.mode) and self.spool.get(d.path) is None:
                self._saw(d.path, d.attr)

    def _recent_dir(self, path: bytes) -> proto.Attr | None:
        seen = self.dirs_seen.get(path)
        if seen is None or time.monotonic() - seen[0] > self.timeout:
            return None
        return seen[1]

    async def _lookup_attr(self, path: bytes) -> proto.Attr:
        """As ``attr_of``, but from a recent listing of the directory when there is one."""
        sf = self.spool.get(path)
        if sf is not None:
            return sf.attr()
        seen = self._recent_dir(path)
        if seen is not None:
            return seen
        found = self.listings.answer(path)
        directory = path.rpartition(b"/")[0]
        if found is listings.STALE or (found is listings.UNKNOWN and self._list_instead(directory)):
            await self._relist(directory)
            found = self.listings.answer(path)
        if found is listings.MISSING:
            raise OSError(errno.ENOENT, "")
        if isinstance(found, proto.Attr):
            return found
        return await self.attr_of(path)

    def _list_instead(self, directory: bytes) -> bool:
        """A second lookup in a directory never listed: list it (one round trip) rather
        than ask for each name (a job opening a sequence it was named by pattern, say)."""
        if self.listings.has(directory):
            return False
        n = self._unlisted_lookups.get(directory, 0) + 1
        self._unlisted_lookups[directory] = n
        return n == 2

    async def _relist(self, directory: bytes) -> None:
        """Read a directory's listing again; concurrent lookups share one request."""
        busy = self._relisting.get(directory)
        if busy is not None:
            await busy.wait()
            return
        self._relisting[directory] = done = trio.Event()
        try:
            await self._list(directory)
        except OSError:
            self.listings.drop(directory)
        finally:
            del self._relisting[directory]
            done.set()

    async def _list(
        self, directory: bytes, *, by_job: bool = False, ahead: bool = False
    ) -> list[proto.DirEntry]:
        """The client's listing of ``directory`` (``by_job``: the job's readdir;
        ``ahead``: a walk's next directory). Those two may carry small files' content:
        the job is about to go through them; a listing for lookups carries none."""
        asked = self.listings.now()
        inline = LISTING_INLINE if by_job or ahead else 0
        listing = await self.client.call(proto.ListDir(directory, inline), proto.PRIO_URGENT)
        for e in listing.entries:
            self.known[join(directory, e.name)] = e.attr
            self._saw(join(directory, e.name), e.attr)
        self.listings.listed(directory, {e.name: e.attr for e in listing.entries}, asked)
        self.cache.remember_listing(directory, listing.entries)
        entries = [(e.name, e.attr) for e in listing.entries]
        self._prefetch(self.follower.listed(directory, entries, by_job=by_job))
        return listing.entries

    def _prefetch(self, ahead: Ahead) -> None:
        """Start what the follower asks for: files to pull, a directory to list."""
        if ahead.files:
            self.cache.nursery.start_soon(self.cache.follow, ahead.files)
        if ahead.list_dir is not None:
            self.cache.nursery.start_soon(self._list_ahead, ahead.list_dir)

    async def _list_ahead(self, directory: bytes) -> None:
        try:
            await self._list(directory, ahead=True)
        except OSError as e:
            log.info("listing %r ahead of the job failed: %s", directory, e)

    def _forget_known(self, path: bytes) -> None:
        prefix = path + b"/"
        for p in [p for p in self.known if p == path or p.startswith(prefix)]:
            del self.known[p]
        for p in [p for p in self.dirs_seen if p == path or p.startswith(prefix)]:
            del self.dirs_seen[p]

    def _add_handle(self, h: Handle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = h
        return fh

    def _file(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if not isinstance(h, Handle):
            raise OSError(errno.EBADF, "bad file handle")
        return h

    def _writer_opened(self, sf: SpoolFile, ctx: Any) -> Handle:
        owner = self.owner_of(ctx.pid)
        sf.writers += 1
        sf.owner = owner
        self.stats.writers[owner] = self.stats.writers.get(owner, 0) + 1
        return Handle(spool=sf, writable=True, owner=owner)

    def _writer_closed(self, h: Handle) -> None:
        assert h.spool is not None
        writers = self.stats.writers
        writers[h.owner] -= 1
        if writers[h.owner] <= 0:
            del writers[h.owner]
        self.stats.writers_changed.set()
        self.stats.writers_changed = trio.Event()
        self.spool.writer_closed(h.spool)

    async def _adopt(self, path: bytes, truncate: bool) -> SpoolFile:
        """Bring a client file into the spool so it can be modified."""
        attr = (await self.client.call(proto.Stat(path), proto.PRIO_URGENT)).attr
        if not stat.S_ISREG(attr.mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(attr.mode) else errno.EACCES, "")
        if truncate:
            return self.spool.adopt(path, attr, None)
        cached = await self.cache.open(path, attr)
        try:
            await cached.wait_complete()
            return self.spool.adopt(path, cached.attr, cached.fd)
        finally:
            self.cache.release(cached)

    # --- changes made on the client (long-lived sessions) ----------------------------

    async def invalidate(self, paths: list[bytes]) -> None:
        """These paths changed on the client: forget them here and in the kernel.

        A spool file the job is still writing (or has not committed) is kept: the
        job's version wins, and its commit refuses to overwrite the changed file
        silently. Open handles keep the content they started with; only later opens
        and lookups see the change.
        """
        kernel: list[tuple[int, bytes | None]] = []
        for path in paths:
            sf = self.spool.get(path)
            if sf is not None:
                if sf.dirty or sf.writers or sf.lock.locked():
                    continue
                self.spool.forget(sf)
            self._forget_known(path)
            self.listings.drop(path)
            self.follower.forget(path)
            self.follower.forget(path.rpartition(b"/")[0])
            self.cache.drop_path(path)
            parent, _, name = path.rpartition(b"/")
            parent_ino = self.inodes.known(parent)
            if parent_ino is not None:
                kernel.append((parent_ino, name))
            ino = self.inodes.known(path)
            if ino is not None:
                kernel.append((ino, None))
        if kernel:
            # In a worker thread: the kernel may first need an answer to a request that
            # only this (trio) thread can give, and would wait for it forever.
            await trio.to_thread.run_sync(_notify_kernel, kernel)

    # --- metadata -------------------------------------------------------------------

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        parent = self.inodes.path(parent_inode)
        if name == b".":
            path = parent
        elif name == b"..":
            path = parent.rpartition(b"/")[0]
        else:
            path = join(parent, name)
        attr = await self._lookup_attr(path)
        ino = self.inodes.ino(path)
        self.inodes.looked_up(ino)
        return self.entry(ino, attr)

    @handler
    async def getattr(self, inode: int, ctx: Any) -> Any:
        path = self.inodes.path(inode)
        attr = self._recent_dir(path)
        return self.entry(inode, attr or await self.attr_of(path))

    @handler
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        path = self.inodes.path(inode)
        self.known.pop(path, None)
        self.dirs_seen.pop(path, None)
        self.listings.touched(path)
        sf = self.spool.get(path)
        if fields.update_size:
            if sf is None:
                sf = await self._adopt(path, truncate=attr.st_size == 0)
            async with sf.lock:
                self.spool.truncate(sf, attr.st_size)
            if sf.writers == 0:
                self.spool.schedule(sf)
        mode = attr.st_mode & 0o7777 if fields.update_mode else None
        atime = attr.st_atime_ns if fields.update_atime else None
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        if mode is not None or atime is not None or mtime is not None:
            if sf is None:
                req = proto.SetAttr(path, mode, atime, mtime)
                res = await self.client.call(req, proto.PRIO_URGENT)
                return self.entry(inode, res.attr)
            async with sf.lock:
                if mode is not None:
                    sf.mode = mode
                if mtime is not None:
                    sf.mtime_ns = mtime
                # A clean file's bytes are the client's already (committed, or opened
                # for writing and not written yet, as `touch` does): change it there.
                target = sf.committed_path or (sf.path if sf.expect is not None else None)
                if not sf.dirty and target is not None:
                    req = proto.SetAttr(target, mode, atime, mtime)
                    await self.client.call(req, proto.PRIO_URGENT)
        return self.entry(inode, await self.attr_of(path))

    @handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        res = await self.client.call(proto.ReadLink(self.inodes.path(inode)), proto.PRIO_URGENT)
        return res.target

    @handler
    async def statfs(self, ctx: Any) -> Any:
        s = await self.client.call(proto.StatFs(), proto.PRIO_URGENT)
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.block_size
        out.f_frsize = s.block_size
        out.f_blocks = s.blocks
        out.f_bfree = s.blocks_free
        out.f_bavail = s.blocks_avail
        out.f_files = s.files
        out.f_ffree = s.files_free
        out.f_favail = s.files_free
        out.f_namemax = s.name_max
        return out

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    # --- extended attributes ----------------------------------------------------------
    # None are kept. ENOSYS (not pyfuse3's default ENOATTR) tells the kernel to stop
    # asking: otherwise `ls -l` asks twice per entry and every 1 MiB WRITE first asks
    # for security.capability, one round trip through this thread each.

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # --- directories ----------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        return self._add_handle(DirHandle(self.inodes.path(inode)))

    @handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        h = self._handles.get(fh)
        if not isinstance(h, DirHandle):
            raise OSError(errno.EBADF, "bad directory handle")
        if h.entries is None or start_id == 0:
            # The spool's files before and after asking: one committed while the
            # listing was on its way left the spool but may not be in the listing.
            pending = {name: sf.attr() for name, sf in self.spool.children(h.path).items()}
            merged = {e.name: e.attr for e in await self._list(h.path, by_job=True)}
            merged.update(pending)
            for name, sf in self.spool.children(h.path).items():
                merged[name] = sf.attr()
            # "." and ".." as any directory lists them; the kernel takes only their
            # inode numbers and types, and counts no lookups for them.
            dots = proto.Attr(stat.S_IFDIR | 0o755, 0, 0, 0, 0)
            h.entries = [(b".", dots), (b"..", dots), *sorted(merged.items())]
        for i in range(start_id, len(h.entries)):
            name, attr = h.entries[i]
            if i < 2:
                here = h.path if i == 0 else h.path.rpartition(b"/")[0]
                ino = self.inodes.known(here) or self.inodes.known(h.path) or ROOT
                if not pyfuse3.readdir_reply(token, name, self.entry(ino, attr), i + 1):
                    return
                continue
            ino = self.inodes.ino(join(h.path, name))
            if not pyfuse3.readdir_reply(token, name, self.entry(ino, attr), i + 1):
                return
            self.inodes.looked_up(ino)

    @handler
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = join(self.inodes.path(parent_inode), name)
        self.listings.touched(path)
        res = await self.client.call(proto.Mkdir(path, mode), proto.PRIO_URGENT)
        self.listings.listed(path, {})  # new, so empty: lookups in it need not ask
        self._saw(path, res.attr)
        ino = self.inodes.ino(path)
        self.inodes.looked_up(ino)
        return self.entry(ino, res.attr)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = join(self.inodes.path(parent_inode), name)
        self.listings.touched(path)
        await self.client.call(proto.Rmdir(path), proto.PRIO_URGENT)
        self.listings.drop(path)
        self._forget_known(path)
        self.inodes.drop(path)

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        path = join(self.inodes.path(parent_inode), name)
        self.listings.touched(path)
        res = await self.client.call(proto.Symlink(path, target), proto.PRIO_URGENT)
        ino = self.inodes.ino(path)
        self.inodes.looked_up(ino)
        return self.entry(ino, res.attr)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = join(self.inodes.path(parent_inode), name)
        self.listings.touched(path)
        sf = self.spool.get(path)
        if sf is None:
            await self.client.call(proto.Unlink(path), proto.PRIO_URGENT)
        else:
            async with sf.lock:
                if sf.committed_path is not None:
                    try:
                        await self.client.call(proto.Unlink(sf.committed_path), proto.PRIO_URGENT)
                    except FileNotFoundError:
                        pass
                self.spool.forget(sf)
            self.spool.retire_if_idle(sf)  # forget could not while we held its lock
        self.cache.drop_path(path)
        self.known.pop(path, None)
        self.inodes.drop(path)

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        old = join(self.inodes.path(parent_inode_old), name_old)
        new = join(self.inodes.path(parent_inode_new), name_new)
        self._check_write(old, "rename", ctx)
        self._check_write(new, "rename", ctx)
        src = self.spool.get(old)
        dst = self.spool.get(new)
        self.listings.moved(old, new)
        if noreplace and dst is not None:
            raise OSError(errno.EEXIST, "destination exists")
        # Outputs below ``old`` (a directory) may be on the wire: their commits' ends
        # name them where they are then, so the rename only waits for a begin or end
        # in flight (see spool.py). A file renamed itself waits for its whole commit.
        if src is None:
            async with self.spool.names_held(old, new):
                await self.client.call(proto.Rename(old, new, noreplace), proto.PRIO_URGENT)
                if dst is not None:
                    self.spool.forget(dst)  # the client's rename replaced its committed copy
                self.spool.move(old, new)
        else:
            async with src.lock, self.spool.names_held(old, new):
                if src.committed_path is not None:
                    req = proto.Rename(src.committed_path, new, noreplace)
                    await self.client.call(req, proto.PRIO_URGENT)
                    src.committed_path = new
                if dst is not None and dst is not src:
                    self.spool.forget(dst)
                self.spool.move(old, new)
                src.check = False  # the job chose to replace whatever is at ``new``
        self.cache.drop_path(old)
        self.cache.drop_path(new)
        self.listings.drop(old)  # again: a lookup may have listed them meanwhile
        self.listings.drop(new)
        self._forget_known(old)
        self._forget_known(new)
        self.inodes.move(old, new)

    # --- files ----------------------------------------------------------------------

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = join(self.inodes.path(parent_inode), name)
        self._check_write(path, "create", ctx)
        self.listings.touched(path)
        sf = self.spool.create(path, mode)
        self.spool.opened(sf)
        handle = self._writer_opened(sf, ctx)
        ino = self.inodes.ino(path)
        self.inodes.looked_up(ino)
        fh = self._add_handle(handle)
        self.stats.opens += 1
        if self.mountpoint is not None:  # its fd follows renames; its upload does too
            self.spool.nursery.start_soon(
                nudge.follow_writer,
                self.mountpoint / os.fsdecode(path),
                lambda: sf.writers > 0 and sf.path is not None and not self.spool.frozen,
            )
        return pyfuse3.FileInfo(fh=fh), self.entry(ino, sf.attr())

    @handler
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        path = self.inodes.path(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.stats.opens += 1
        sf = self.spool.get(path)
        if writable:
            self._check_write(path, "write", ctx)
            self.listings.touched(path)
            if sf is None:
                sf = await self._adopt(path, truncate=bool(flags & os.O_TRUNC))
            self.spool.opened(sf)  # before waiting: the commit's end must not retire it
            try:
                async with sf.lock:  # wait out a commit in flight
                    if flags & os.O_TRUNC:
                        self.spool.truncate(sf, 0)
                        sf.streamable = sf.writers == 0
                    handle = self._writer_opened(sf, ctx)
            except BaseException:
                self.spool.released(sf)
                raise
            return pyfuse3.FileInfo(fh=self._add_handle(handle))
        if sf is not None:
            self.spool.opened(sf)
            return pyfuse3.FileInfo(fh=self._add_handle(Handle(spool=sf)))
        self._prefetch(self.follower.opened(path))
        cached = await self.cache.open(path, self.known.get(path))
        self.cache.job_opened(cached)
        fh = self._add_handle(Handle(cached=cached))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._file(fh)
        self.stats.reads += 1
        if h.spool is not None:
            return os.pread(h.spool.fd, size, off)
        assert h.cached is not None
        return await h.cached.read(off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._file(fh)
        if not h.writable or h.spool is None:
            raise OSError(errno.EBADF, "not open for writing")
        self.stats.writes += 1
        return self.spool.write(h.spool, off, buf)

    # With the writeback cache a failed WRITE reaches the kernel, not the job's write(2);
    # the kernel reports it at the next close or fsync, unless another opener's close
    # took it first (nudge.py's, say). So the spool file keeps it, and every flush
    # (each close) and fsync of a writer returns it.

    @handler
    async def flush(self, fh: int) -> None:
        h = self._handles.get(fh)
        if isinstance(h, Handle) and h.writable and h.spool is not None:
            h.spool.raise_if_failed()

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._file(fh)
        if h.spool is not None:
            try:
                os.fsync(h.spool.fd)
            except OSError as e:
                self.spool.failed(h.spool, e)
            if h.writable:
                h.spool.raise_if_failed()

    @handler
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if not isinstance(h, Handle):
            return
        if h.cached is not None:
            self.cache.release(h.cached)
        elif h.spool is not None:
            if h.writable:
                self._writer_closed(h)
            self.spool.released(h.spool)
