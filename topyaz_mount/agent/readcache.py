"""Client files on the remote disk: from the content store, or pulled whole.

Opening a file asks the client for it; the answer carries the content hash when the
client knows it. Content the store (``store.py``) has is served from there and nothing
moves. Otherwise the whole file is pulled in 1 MiB chunks into a sparse temporary file
that becomes a store object once complete and hashed. The chunk requests of all files
share one window of bytes in flight (``bulkwindow.py``), granted in the order the job
will read them. A read waits only for the chunks it covers; a chunk nobody has asked
for yet is requested at once with urgent priority, outside the window, so a reader that
seeks never waits behind the prefetch.

Open entries are keyed by (path, size, mtime_ns): a file changed on the client is a new
entry. Closed entries stay open for reuse until ``keep_bytes`` is exceeded.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import trio

from ..wire import proto
from . import hostos
from .bulkwindow import BulkWindow
from .store import OUTPUT_KEEP_LIMIT, ContentStore

log = logging.getLogger(__name__)


# Prefetch bytes requested and not yet arrived, over all files: a 200 Mbit/s link with
# 20 ms of round trip holds 0.5 MB, a 1 Gbit/s one with 50 ms 6 MB.
BULK_WINDOW = 8 << 20

# Transfers the prefetch keeps open at once: opens outrun the link, and each holds a
# file open on the client (which refuses more than 1024), where the job's own opens
# must still fit.
PREFETCH_OPEN_MAX = 256

# Opens in flight at once for files the job is expected to open next (follow.py).
FOLLOW_PARALLEL = 8

# Small files' content that listings carried, held in memory until it is a store
# object (at once, in the background); the oldest go past this.
INLINE_KEEP = 64 << 20


class ChunkSource(Protocol):
    async def open_read(self, path: bytes) -> tuple[int, proto.Attr, bytes | None]: ...
    async def read_chunk(self, handle: int, offset: int, length: int, prio: int) -> bytes: ...
    async def close_read(self, handle: int) -> None: ...


class CachedFile:
    def __init__(
        self,
        cache: ReadCache,
        path: bytes,
        attr: proto.Attr,
        handle: int,
        fd: int,
        *,
        complete: bool = False,
        order: int = 0,
    ) -> None:
        self.cache = cache
        self.path = path
        self.attr = attr
        self.size = attr.size
        self.fd = fd
        self.handle = handle
        self.chunk = cache.chunk_size
        self.count = (self.size + self.chunk - 1) // self.chunk
        self.have = bytearray(self.count)
        self.requested = bytearray(self.count)
        self.arrived = 0
        self.next_index = 0
        self.events: dict[int, trio.Event] = {}
        self.error: OSError | None = None
        self.users = 0
        self.done = trio.Event()
        self.temp: Path | None = None  # where the bytes go until they become an object
        self.expect: bytes | None = None  # the client's hash of them, if it sent one
        self.digest: bytes | None = None  # known once they are a store object
        self.stored = trio.Event()  # set once they are a store object, or never will be
        self.opened_by_job = False
        self.prefetched = 0  # bytes of prefetch window this entry holds until opened
        self.switched = False
        self.fetched = 0
        self.order = order  # place in the prefetch; the bulk window serves files by it
        if complete:
            self.have = bytearray(b"\x01" * self.count)
            self.requested = bytearray(b"\x01" * self.count)
            self.arrived = self.count
        if self.arrived == self.count:
            self.done.set()

    async def wait_stored(self) -> bytes | None:
        """The content's blake3 once it is a store object; None if it never will be."""
        await self.stored.wait()
        return self.digest

    @property
    def key(self) -> tuple[bytes, int, int]:
        return (self.path, self.attr.size, self.attr.mtime_ns)

    def turn(self) -> tuple[int, int]:
        """Its place in the bulk window's line: files the job has opened first."""
        return (0 if self.opened_by_job else 1, self.order)

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        for i in range(offset // self.chunk, (end - 1) // self.chunk + 1):
            await self._wait_chunk(i)
        return hostos.pread(self.fd, end - offset, offset)

    async def wait_complete(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error

    async def _wait_chunk(self, i: int) -> None:
        if self.error is not None:
            raise self.error
        if self.have[i]:
            return
        if not self.requested[i]:
            self.requested[i] = 1
            self.cache.nursery.start_soon(self._fetch_guarded, i, proto.PRIO_URGENT, 0)
        event = self.events.get(i)
        if event is None:
            event = self.events[i] = trio.Event()
        await event.wait()
        if self.error is not None:
            raise self.error

    def _first_unrequested(self) -> int | None:
        while self.next_index < self.count and self.requested[self.next_index]:
            self.next_index += 1
        return self.next_index if self.next_index < self.count else None

    def _length(self, i: int) -> int:
        return min(self.chunk, self.size - i * self.chunk)

    def start_next(self) -> int | None:
        """The bulk window has room: request the next chunk nobody has asked for."""
        i = self._first_unrequested()
        if i is None or self.error is not None or self.switched:
            return None
        self.requested[i] = 1
        size = self._length(i)
        self.cache.nursery.start_soon(self._fetch_guarded, i, proto.PRIO_BULK, size)
        return size

    async def _fetch_guarded(self, i: int, prio: int, charged: int) -> None:
        """Fetch chunk ``i``; give back the window room it was ``charged``."""
        try:
            try:
                last = await self._fetch(i, prio)
            finally:
                if charged:
                    self.cache.bulk.release(charged)
            if last:
                await self.cache.finished(self)
        except OSError as e:
            self.fail(e)

    async def _fetch(self, i: int, prio: int) -> bool:
        """Fetch chunk ``i`` into the file; True if it was the last one missing."""
        offset = i * self.chunk
        length = self._length(i)
        data = await self.cache.source.read_chunk(self.handle, offset, length, prio)
        if self.switched:
            return False  # the store had this content after all; see switch_to
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.path!r} changed on the client while being read")
        hostos.pwrite_all(self.fd, data, offset)
        self.fetched += length
        self.cache.bytes_fetched += length
        self.have[i] = 1
        self.arrived += 1
        event = self.events.pop(i, None)
        if event is not None:
            event.set()
        if self.arrived == self.count:
            self.done.set()
            return True
        return False

    def switch_to(self, fd: int) -> None:
        """Serve from the store's copy from now on; the transfer is no longer needed."""
        old, self.fd = self.fd, fd
        os.close(old)
        self.switched = True
        self.have = bytearray(b"\x01" * self.count)
        self.requested = bytearray(b"\x01" * self.count)
        self.arrived = self.count
        for event in self.events.values():
            event.set()
        self.events.clear()
        self.done.set()

    def fail(self, error: OSError) -> None:
        if self.error is not None or self.switched:
            return  # (after a switch, requests still in flight may fail: irrelevant)
        log.warning("fetching %r failed: %s", self.path, error)
        self.error = error
        for event in self.events.values():
            event.set()
        self.events.clear()
        self.done.set()
        self.cache.nursery.start_soon(self.cache.finished, self)


class ReadCache:
    def __init__(
        self,
        store: ContentStore,
        source: ChunkSource,
        nursery: trio.Nursery,
        *,
        window: int = BULK_WINDOW,
        chunk_size: int = proto.CHUNK_SIZE,
        keep_bytes: int = 4 << 30,
    ) -> None:
        self.store = store
        self.source = source
        self.nursery = nursery
        self.bulk = BulkWindow(window)
        self._order = itertools.count()
        self.chunk_size = chunk_size
        self.keep_bytes = keep_bytes
        self._entries: dict[tuple[bytes, int, int], CachedFile] = {}
        self._idle: OrderedDict[tuple[bytes, int, int], CachedFile] = OrderedDict()
        self._closed_handles: set[int] = set()
        self._opening: dict[bytes, trio.Lock] = {}
        # Content hashes the client sent ahead of any open (a manifest, a listing):
        # opening those files costs no round trip when the store has them.
        self.manifest_digests: dict[tuple[bytes, int, int], bytes] = {}
        self.named: set[bytes] = set()  # paths a manifest announced (see follow.py)
        # Content listings carried, by key: (data, the client's hash of it), until stored;
        # and the keys it came for (their first open is a miss: the bytes crossed).
        self._inline: OrderedDict[tuple[bytes, int, int], tuple[bytes, bytes]] = OrderedDict()
        self._inline_bytes = 0
        self._carried: set[tuple[bytes, int, int]] = set()
        self._follow_slots = trio.Semaphore(FOLLOW_PARALLEL)
        self._by_handle: dict[int, CachedFile] = {}  # transfers under way, by client handle
        self._storing = 0  # complete files being hashed into the store right now
        self._ahead = 0  # bytes prefetched that the job has not opened yet
        self._room = trio.Event()
        self.bytes_fetched = 0
        self.prefetch_hits = 0  # job opens of files a prefetch had opened first
        self.followed = 0  # files prefetched because the job was seen reading in order

    async def open(
        self, path: bytes, attr: proto.Attr | None, order: int | None = None
    ) -> CachedFile:
        """A file to read, reusing a copy of the same (path, size, mtime) if we have one.

        Opens of one path are serialized, so concurrent readers (or the prefetcher and
        the job) share one transfer instead of each pulling the whole file. ``order``
        is the file's place in the prefetch (default: after everything so far)."""
        lock = self._opening.setdefault(path, trio.Lock())
        if order is None:
            order = next(self._order)
        try:
            async with lock:
                return await self._open(path, attr, order)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._opening.pop(path, None)

    async def _open(self, path: bytes, attr: proto.Attr | None, order: int) -> CachedFile:
        if attr is not None:
            key = (path, attr.size, attr.mtime_ns)
            entry = self._entries.get(key)
            if entry is not None and entry.error is None:
                self._idle.pop(entry.key, None)
                entry.users += 1
                return entry
            digest = self.manifest_digests.get(key)
            inline = self._take_inline(key)
            carried = key in self._carried
            self._carried.discard(key)
            if digest is not None:  # named in the manifest: no need to ask the client
                entry = await self._from_store(path, attr, -1, digest, carried=carried)
                if entry is not None:
                    return entry
            if inline is not None:  # a listing carried it, not stored yet: nor here
                return self._from_inline(path, attr, *inline)
        handle, actual, digest = await self.source.open_read(path)
        entry = self._entries.get((path, actual.size, actual.mtime_ns))
        if entry is not None and entry.error is None:
            await self._close_handle(handle)
            self._idle.pop(entry.key, None)
            entry.users += 1
            return entry
        if digest is not None:
            entry = await self._from_store(path, actual, handle, digest)
            if entry is not None:
                await self._close_handle(handle)
                return entry
        self.store.misses += 1
        fd, temp = self.store.new_temp(actual.size)
        entry = CachedFile(self, path, actual, handle, fd, order=order)
        entry.temp = temp
        entry.expect = digest
        entry.users = 1
        self._entries[entry.key] = entry
        self._by_handle[handle] = entry
        if entry.count:
            self.bulk.add(entry)
        else:
            self.nursery.start_soon(self.finished, entry)
        return entry

    async def _from_store(
        self, path: bytes, attr: proto.Attr, handle: int, digest: bytes, carried: bool = False
    ) -> CachedFile | None:
        """``carried``: a listing brought the bytes this session (a miss, not a hit)."""
        fd = await trio.to_thread.run_sync(self.store.open, digest, attr.size)
        if fd is None:
            return None
        if carried:
            self.store.misses += 1
            self.bytes_fetched += attr.size
        else:
            self.store.hits += 1
            self.store.bytes_saved += attr.size
        entry = CachedFile(self, path, attr, handle, fd, complete=True)
        entry.users = 1
        entry.digest = digest
        entry.stored.set()
        self._entries[entry.key] = entry
        return entry

    def _take_inline(self, key: tuple[bytes, int, int]) -> tuple[bytes, bytes] | None:
        found = self._inline.pop(key, None)
        if found is not None:
            self._inline_bytes -= len(found[0])
        return found

    def _temp_holding(self, data: bytes) -> tuple[int, Path]:
        """A store temp file with ``data`` in it."""
        fd, temp = self.store.new_temp(len(data))
        try:
            hostos.pwrite(fd, data, 0)
        except OSError:
            os.close(fd)
            self.store.discard_temp(temp)
            raise
        return fd, temp

    def _from_inline(self, path: bytes, attr: proto.Attr, data: bytes, digest: bytes) -> CachedFile:
        """A file whose content a listing carried: complete at once, then stored (the
        store checks it against the client's hash, as for a file pulled whole)."""
        self.store.misses += 1
        fd, temp = self._temp_holding(data)
        entry = CachedFile(self, path, attr, -1, fd, complete=True)
        entry.temp = temp
        entry.expect = digest
        entry.users = 1
        entry.fetched = attr.size
        self.bytes_fetched += attr.size
        self._entries[entry.key] = entry
        self.nursery.start_soon(self.finished, entry)
        return entry

    async def on_hashed(self, handle: int, digest: bytes) -> None:
        """The client has hashed an input it is streaming: stop if we have it already."""
        entry = self._by_handle.get(handle)
        if entry is None or entry.done.is_set() or entry.error is not None:
            return
        entry.expect = digest
        fd = await trio.to_thread.run_sync(self.store.open, digest, entry.size)
        if fd is None:
            return
        if entry.done.is_set() or entry.error is not None:
            os.close(fd)
            return
        entry.switch_to(fd)
        entry.digest = digest
        entry.stored.set()
        self.store.misses -= 1
        self.store.hits += 1
        self.store.bytes_saved += entry.size - entry.fetched
        if entry.temp is not None:
            self.store.discard_temp(entry.temp)
            entry.temp = None
        self._by_handle.pop(handle, None)
        self._room.set()
        await self._close_handle(handle)

    def remember_manifest(self, entries: list[proto.ManifestEntry]) -> None:
        """Hashes the client sent up front: opening those files costs no round trip."""
        for e in entries:
            self.named.add(e.path)
            if e.blake3 is not None:
                self.manifest_digests[(e.path, e.size, e.mtime_ns)] = e.blake3

    def remember_listing(self, directory: bytes, entries: list[proto.DirEntry]) -> None:
        """Hashes a listing carried (the client's index): as a manifest's; and the
        content of small files it carried, which becomes store objects: the client
        sends those files' hashes alone from now on, so the store must have them."""
        carried = []
        for e in entries:
            path = directory + b"/" + e.name if directory else e.name
            key = (path, e.attr.size, e.attr.mtime_ns)
            if e.blake3 is not None:
                self.manifest_digests[key] = e.blake3
            if e.data is not None and len(e.data) == e.attr.size and e.blake3 is not None:
                self._take_inline(key)
                self._inline[key] = (e.data, e.blake3)
                self._inline_bytes += len(e.data)
                self._carried.add(key)
                carried.append(key)
        while self._inline_bytes > INLINE_KEEP:
            key, (data, _digest) = self._inline.popitem(last=False)
            self._inline_bytes -= len(data)
            self._carried.discard(key)
        if carried:
            self._storing += 1
            self.nursery.start_soon(self._store_carried, carried)

    async def _store_carried(self, keys: list[tuple[bytes, int, int]]) -> None:
        try:
            found = [(key, self._inline[key]) for key in keys if key in self._inline]
            stored = await trio.to_thread.run_sync(self._write_objects, [f[1] for f in found])
            for (key, item), ok in zip(found, stored, strict=True):
                if ok and self._inline.get(key) is item:
                    self._take_inline(key)  # the store answers its open from now on
        finally:
            self._storing -= 1

    def _write_objects(self, items: list[tuple[bytes, bytes]]) -> list[bool]:
        """(In a thread.) Each content as a store object, checked against its hash."""
        stored = []
        for data, digest in items:
            try:
                if self.store.has(digest, len(data)):
                    stored.append(True)
                    continue
                fd, temp = self._temp_holding(data)
                try:
                    self.store.add(temp, fd, digest)
                finally:
                    os.close(fd)
                stored.append(True)
            except OSError as e:
                log.info("could not keep a file a listing carried: %s", e)
                stored.append(False)
        return stored

    async def follow(self, wanted: list[tuple[bytes, proto.Attr]]) -> None:
        """Pull files the job is expected to open next (follow.py), in that order.

        As the manifest's prefetch: several opens in flight, within PREFETCH_OPEN_MAX
        transfers; the bytes stay counted ahead until the job opens them."""
        self.followed += len(wanted)
        async with trio.open_nursery() as nursery:
            for path, attr in wanted:
                while len(self._by_handle) + FOLLOW_PARALLEL >= PREFETCH_OPEN_MAX:
                    self._room = trio.Event()
                    await self._room.wait()
                await self._follow_slots.acquire()
                self._ahead += attr.size
                nursery.start_soon(
                    self._prefetch_one, path, attr, next(self._order), self._follow_slots
                )

    async def prefetch(
        self, wanted: list[tuple[bytes, proto.Attr]], window: int, parallel: int = 8
    ) -> None:
        """Pull the manifest's missing inputs in order, staying ``window`` bytes ahead
        of what the job has opened, so a huge batch does not flood the remote disk.

        Several opens are in flight at once, so a batch of small files costs no round
        trip per file on a long link; at most PREFETCH_OPEN_MAX transfers are under way."""
        slots = trio.Semaphore(parallel)
        async with trio.open_nursery() as nursery:
            for path, attr in wanted:
                while self._ahead > window or (
                    len(self._by_handle) + parallel - slots.value >= PREFETCH_OPEN_MAX
                ):
                    self._room = trio.Event()
                    await self._room.wait()
                await slots.acquire()
                self._ahead += attr.size  # reserved now, returned when the job opens it
                nursery.start_soon(self._prefetch_one, path, attr, next(self._order), slots)

    async def _prefetch_one(
        self, path: bytes, attr: proto.Attr, order: int, slots: trio.Semaphore
    ) -> None:
        try:
            entry = await self.open(path, attr, order)
        except OSError as e:
            log.info("prefetch of %r skipped: %s", path, e)
            self._give_back(attr.size)
            return
        finally:
            slots.release()
        if entry.opened_by_job or entry.prefetched:
            self._give_back(attr.size)
        else:
            entry.prefetched = attr.size
        self.release(entry)

    def _give_back(self, size: int) -> None:
        self._ahead -= size
        self._room.set()

    def job_opened(self, entry: CachedFile) -> None:
        if not entry.opened_by_job:
            entry.opened_by_job = True
            self.prefetch_hits += bool(entry.prefetched)
            if not entry.done.is_set():
                self.bulk.moved_up(entry)
            if entry.prefetched:
                self._give_back(entry.prefetched)

    def release(self, entry: CachedFile) -> None:
        entry.users -= 1
        if entry.users <= 0:
            entry.users = 0
            self._idle[entry.key] = entry
            self._idle.move_to_end(entry.key)
            self._evict()

    def let_go(self, entry: CachedFile) -> bool:
        """Forget ``entry`` and close its fd, if nobody else uses it: the stage backend
        then lends its store object to the tree (store.lend). False if in use."""
        if entry.users != 1 or not entry.done.is_set():
            return False
        entry.users = 0
        self._discard(entry)
        return True

    def drop_path(self, path: bytes) -> None:
        """Forget cached copies of ``path`` (the client changed or removed it)."""
        for key in [k for k in self.manifest_digests if k[0] == path]:
            del self.manifest_digests[key]
        for key in [k for k in self._inline if k[0] == path]:
            self._take_inline(key)
        self._carried = {k for k in self._carried if k[0] != path}
        for key in [k for k in self._entries if k[0] == path]:
            entry = self._entries[key]
            if entry.users == 0:
                self._discard(entry)

    async def finished(self, entry: CachedFile) -> None:
        """The transfer ended: give the client its fd back (it may remember the file's
        hash then); store or drop the bytes. Teardown waits for this (wait_stored)."""
        self._storing += 1
        self._by_handle.pop(entry.handle, None)
        self._room.set()  # the prefetch may open another
        try:
            await self._close_handle(entry.handle)
            temp, entry.temp = entry.temp, None
            if entry.error is None and temp is not None:
                try:
                    entry.digest = await trio.to_thread.run_sync(
                        self.store.add, temp, entry.fd, entry.expect
                    )
                except OSError as e:
                    entry.fail(e)
                    return
            elif temp is not None:
                self.store.discard_temp(temp)
        finally:
            self._storing -= 1
            entry.stored.set()
        if entry.error is not None and self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            if entry.users == 0:
                self._discard(entry)

    async def _close_handle(self, handle: int) -> None:
        if handle < 0 or handle in self._closed_handles:
            return
        self._closed_handles.add(handle)
        try:
            await self.source.close_read(handle)
        except OSError:
            pass  # the connection is gone; the client closes its fds on exit anyway

    def _evict(self) -> None:
        held = sum(e.size for e in self._idle.values())
        while held > self.keep_bytes and self._idle:
            _, entry = self._idle.popitem(last=False)
            if not entry.done.is_set():
                self._idle[entry.key] = entry  # still arriving: keep, try later
                break
            held -= entry.size
            self._discard(entry)

    def _discard(self, entry: CachedFile) -> None:
        self._idle.pop(entry.key, None)
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.fd >= 0:
            os.close(entry.fd)
            entry.fd = -1

    def keep_output(self, fd: int, digest: bytes, size: int) -> None:
        """A committed output becomes a store object too (copied in the background)."""
        if size > OUTPUT_KEEP_LIMIT:
            return
        dup = os.dup(fd)  # the spool may close its fd while we copy
        self._storing += 1
        self.nursery.start_soon(self._copy_output, dup, digest, size)

    async def _copy_output(self, fd: int, digest: bytes, size: int) -> None:
        try:
            await trio.to_thread.run_sync(self.store.copy_in, fd, digest, size)
        except OSError as e:
            log.info("could not keep an output in the store: %s", e)
        finally:
            os.close(fd)
            self._storing -= 1

    async def wait_stored(self) -> None:
        """Let files that arrived in full finish becoming store objects (teardown would
        otherwise close their fds under the hashing thread, and the next run would
        fetch them again)."""
        while self._storing:
            await trio.sleep(0.02)

    def close(self) -> None:
        for entry in list(self._entries.values()) + list(self._idle.values()):
            if entry.temp is not None:
                self.store.discard_temp(entry.temp)
                entry.temp = None
            if entry.fd >= 0:
                os.close(entry.fd)
                entry.fd = -1
        self._entries.clear()
        self._idle.clear()
