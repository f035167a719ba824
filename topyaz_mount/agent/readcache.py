"""Local copies of client files, pulled whole and ahead of the reader.

Opening a file starts a transfer of all of it in 1 MiB chunks with a window of
requests in flight, into a sparse cache file on the remote disk. A read waits only
for the chunks it covers; a chunk nobody has asked for yet is requested at once with
urgent priority, so a reader that seeks never waits behind the prefetch.

Entries are keyed by (path, size, mtime_ns): a file changed on the client is a new
entry. Closed entries stay for reuse until ``keep_bytes`` is exceeded, then the least
recently used go. The one interface the rest of the agent sees is ``open`` /
``CachedFile.read`` / ``release``, so a content-addressed store can take its place.
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

from .. import proto

log = logging.getLogger(__name__)


class ChunkSource(Protocol):
    async def open_read(self, path: bytes) -> tuple[int, proto.Attr]: ...
    async def read_chunk(self, handle: int, offset: int, length: int, prio: int) -> bytes: ...
    async def close_read(self, handle: int) -> None: ...


class CachedFile:
    def __init__(
        self, cache: ReadCache, path: bytes, attr: proto.Attr, handle: int, fd: int
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
        if self.count == 0:
            self.done.set()

    @property
    def key(self) -> tuple[bytes, int, int]:
        return (self.path, self.attr.size, self.attr.mtime_ns)

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        for i in range(offset // self.chunk, (end - 1) // self.chunk + 1):
            await self._wait_chunk(i)
        return os.pread(self.fd, end - offset, offset)

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
            self.cache.nursery.start_soon(self._fetch_guarded, i, proto.PRIO_URGENT)
        event = self.events.get(i)
        if event is None:
            event = self.events[i] = trio.Event()
        await event.wait()
        if self.error is not None:
            raise self.error

    def _next_unrequested(self) -> int | None:
        while self.next_index < self.count and self.requested[self.next_index]:
            self.next_index += 1
        if self.next_index >= self.count:
            return None
        i = self.next_index
        self.requested[i] = 1
        return i

    async def pump(self, window: int) -> None:
        """Request every chunk, ``window`` at a time, in file order."""
        async with trio.open_nursery() as nursery:
            for _ in range(min(window, max(self.count, 1))):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while self.error is None:
            i = self._next_unrequested()
            if i is None:
                return
            await self._fetch_guarded(i, proto.PRIO_BULK)

    async def _fetch_guarded(self, i: int, prio: int) -> None:
        try:
            await self._fetch(i, prio)
        except OSError as e:
            self.fail(e)

    async def _fetch(self, i: int, prio: int) -> None:
        offset = i * self.chunk
        length = min(self.chunk, self.size - offset)
        data = await self.cache.source.read_chunk(self.handle, offset, length, prio)
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.path!r} changed on the client while being read")
        os.pwrite(self.fd, data, offset)
        self.cache.bytes_fetched += length
        self.have[i] = 1
        self.arrived += 1
        event = self.events.pop(i, None)
        if event is not None:
            event.set()
        if self.arrived == self.count:
            self.done.set()
            await self.cache.finished(self)

    def fail(self, error: OSError) -> None:
        if self.error is not None:
            return
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
        directory: Path,
        source: ChunkSource,
        nursery: trio.Nursery,
        *,
        window: int = 16,
        chunk_size: int = proto.CHUNK_SIZE,
        keep_bytes: int = 4 << 30,
    ) -> None:
        self.directory = directory
        self.source = source
        self.nursery = nursery
        self.window = window
        self.chunk_size = chunk_size
        self.keep_bytes = keep_bytes
        self._entries: dict[tuple[bytes, int, int], CachedFile] = {}
        self._idle: OrderedDict[tuple[bytes, int, int], CachedFile] = OrderedDict()
        self._names = itertools.count(1)
        self._closed_handles: set[int] = set()
        self.bytes_fetched = 0

    async def open(self, path: bytes, attr: proto.Attr | None) -> CachedFile:
        """A file to read, reusing a copy of the same (path, size, mtime) if we have one."""
        if attr is not None:
            entry = self._entries.get((path, attr.size, attr.mtime_ns))
            if entry is not None and entry.error is None:
                self._idle.pop(entry.key, None)
                entry.users += 1
                return entry
        handle, actual = await self.source.open_read(path)
        entry = self._entries.get((path, actual.size, actual.mtime_ns))
        if entry is not None and entry.error is None:
            await self._close_handle(handle)
            self._idle.pop(entry.key, None)
            entry.users += 1
            return entry
        name = self.directory / str(next(self._names))
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(name)  # the fd keeps it; nothing to clean up if we die
        os.ftruncate(fd, actual.size)
        entry = CachedFile(self, path, actual, handle, fd)
        entry.users = 1
        self._entries[entry.key] = entry
        if entry.count:
            self.nursery.start_soon(entry.pump, self.window)
        else:
            self.nursery.start_soon(self.finished, entry)
        return entry

    def release(self, entry: CachedFile) -> None:
        entry.users -= 1
        if entry.users <= 0:
            entry.users = 0
            self._idle[entry.key] = entry
            self._idle.move_to_end(entry.key)
            self._evict()

    def drop_path(self, path: bytes) -> None:
        """Forget cached copies of ``path`` (the client changed or removed it)."""
        for key in [k for k in self._entries if k[0] == path]:
            entry = self._entries[key]
            if entry.users == 0:
                self._discard(entry)

    async def finished(self, entry: CachedFile) -> None:
        """The transfer ended (all data or an error): give the client its fd back."""
        await self._close_handle(entry.handle)
        if entry.error is not None and self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            if entry.users == 0:
                self._discard(entry)

    async def _close_handle(self, handle: int) -> None:
        if handle in self._closed_handles:
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

    def close(self) -> None:
        for entry in list(self._entries.values()) + list(self._idle.values()):
            if entry.fd >= 0:
                os.close(entry.fd)
                entry.fd = -1
        self._entries.clear()
        self._idle.clear()
