"""bulkwindow.py and the read cache's prefetch order, against an in-memory client."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest
import trio
import trio.testing

from topyaz_mount.agent import readcache
from topyaz_mount.agent.bulkwindow import BulkWindow
from topyaz_mount.agent.readcache import CachedFile, ReadCache
from topyaz_mount.agent.store import ContentStore
from topyaz_mount.wire import proto

TIMEOUT = 10
MIB = 1 << 20


def run(fn, *args):
    async def main():
        with trio.fail_after(TIMEOUT):
            return await fn(*args)

    return trio.run(main)


# --- the window alone -------------------------------------------------------------------


class FakePuller:
    def __init__(self, name: str, turn: int, chunks: int, log: list[str]) -> None:
        self.name = name
        self.place = turn
        self.chunks = chunks
        self.log = log

    def turn(self) -> int:
        return self.place

    def start_next(self) -> int | None:
        if not self.chunks:
            return None
        self.chunks -= 1
        self.log.append(self.name)
        return 1


def test_window_starts_chunks_in_turn_order_within_its_limit():
    log: list[str] = []
    window = BulkWindow(3)
    window.add(FakePuller("first", 0, 3, log))
    assert log == ["first"] * 3 and window.in_flight == 3
    for name, turn in [("c", 30), ("a", 10), ("b", 20)]:
        window.add(FakePuller(name, turn, 2, log))
    assert window.in_flight == 3 and len(log) == 3  # full: nothing more started
    for _ in range(6):
        window.release(1)
        assert window.in_flight == 3
    assert log[3:] == ["a", "a", "b", "b", "c", "c"]
    for _ in range(3):
        window.release(1)
    assert window.in_flight == 0 and len(log) == 9  # nothing left to start


def test_a_puller_that_moves_up_goes_first():
    log: list[str] = []
    window = BulkWindow(1)
    window.add(FakePuller("first", 0, 1, log))
    x = FakePuller("x", 1, 1, log)
    y = FakePuller("y", 2, 1, log)
    window.add(x)
    window.add(y)
    y.place = 0  # y moved up the line (the job opened it) while waiting
    window.moved_up(y)
    window.release(1)
    assert log == ["first", "y"]
    window.release(1)
    assert log == ["first", "y", "x"]  # y's old place in line is skipped, not served twice
    window.release(1)
    assert window.in_flight == 0


def test_window_line_scales_to_thousands_of_waiting_files():
    log: list[str] = []
    window = BulkWindow(4)
    for i in range(20000):
        window.add(FakePuller(str(i), i, 1, log))
    for _ in range(20000):
        window.release(1)
    assert log == [str(i) for i in range(20000)]


# --- the read cache's prefetch ------------------------------------------------------------


class FakeClient:
    """A ChunkSource with a fixed latency per request and a log of what was asked."""

    def __init__(self, files: dict[bytes, bytes], latency: float = 0.001) -> None:
        self.files = files
        self.latency = latency
        self.handles: dict[int, bytes] = {}
        self.requests: list[tuple[bytes, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.open_now = 0
        self.max_open = 0

    def attr(self, path: bytes) -> proto.Attr:
        return proto.Attr(0o100644, len(self.files[path]), 1, 1, 1)

    async def open_read(self, path: bytes):
        await trio.sleep(0)  # answered at once: opens complete in the order asked
        handle = len(self.handles) + 1
        self.handles[handle] = path
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        return handle, self.attr(path), None

    async def read_chunk(self, handle: int, offset: int, length: int, prio: int) -> bytes:
        path = self.handles[handle]
        self.requests.append((path, offset))
        self.in_flight += length
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.latency)
        finally:
            self.in_flight -= length
        return self.files[path][offset : offset + length]

    async def close_read(self, handle: int) -> None:
        self.open_now -= 1


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def test_prefetch_pulls_files_in_order_within_the_window(store: ContentStore, monkeypatch):
    files = {f"in/{i:02}".encode(): os.urandom(3 * MIB + i) for i in range(6)}
    client = FakeClient(files)
    started: list[tuple[bytes, int]] = []  # in the order the window started them
    start_next = CachedFile.start_next

    def recording(self: CachedFile) -> int | None:
        i = self._first_unrequested()
        size = start_next(self)
        if size is not None:
            started.append((self.path, i))
        return size

    monkeypatch.setattr(CachedFile, "start_next", recording)

    async def body():
        async with trio.open_nursery() as nursery:
            cache = ReadCache(store, client, nursery, window=4 * MIB, chunk_size=MIB)
            wanted = [(p, client.attr(p)) for p in files]
            await cache.prefetch(wanted, window=1 << 30)
            for path in files:
                entry = await cache.open(path, client.attr(path))
                await entry.wait_complete()
                assert await entry.read(0, len(files[path])) == files[path]
                cache.release(entry)
            await cache.wait_stored()
            cache.close()

    run(body)
    # Every chunk once, file after file in manifest order, never more in flight than
    # the window (plus the chunk that crossed it).
    assert started == sorted(started) and len(started) == len(set(started))
    assert len(client.requests) == len(started)
    assert client.max_in_flight < 4 * MIB + MIB


def test_a_file_the_job_opens_overtakes_the_prefetch(store: ContentStore):
    files = {f"in/{i:02}".encode(): os.urandom(4 * MIB) for i in range(4)}
    files[b"other"] = os.urandom(2 * MIB)
    client = FakeClient(files, latency=0.01)

    async def body():
        async with trio.open_nursery() as nursery:
            cache = ReadCache(store, client, nursery, window=MIB, chunk_size=MIB)
            wanted = [(p, client.attr(p)) for p in files if p.startswith(b"in/")]
            nursery.start_soon(cache.prefetch, wanted, 1 << 30)
            while not client.requests:
                await trio.sleep(0.001)
            entry = await cache.open(b"other", client.attr(b"other"))
            cache.job_opened(entry)
            await entry.wait_complete()
            # "other" went ahead of the batch (16 chunks) as soon as the job opened it.
            last_other = max(i for i, (p, _) in enumerate(client.requests) if p == b"other")
            assert last_other < 6
            cache.release(entry)
            await cache.wait_stored()
            nursery.cancel_scope.cancel()
        cache.close()

    run(body)


def test_prefetch_keeps_a_bounded_number_of_client_files_open(store, monkeypatch):
    # Opens take no time here and chunks do: without a bound every file of the batch
    # would be open on the client at once, and the client refuses past 1024.
    monkeypatch.setattr(readcache, "PREFETCH_OPEN_MAX", 5)
    files = {f"in/{i:03}".encode(): os.urandom(4096) for i in range(60)}
    client = FakeClient(files, latency=0.002)

    async def body():
        async with trio.open_nursery() as nursery:
            cache = ReadCache(store, client, nursery, window=2 * 4096, chunk_size=MIB)
            await cache.prefetch([(p, client.attr(p)) for p in files], window=1 << 30)
            for path in files:
                entry = await cache.open(path, client.attr(path))
                await entry.wait_complete()
                cache.release(entry)
            await cache.wait_stored()
            cache.close()

    run(body)
    assert client.max_open <= 5
    assert len(client.requests) == 60


# --- small files a listing carried ----------------------------------------------------------


def test_a_file_a_listing_carried_opens_without_asking_the_client(store: ContentStore):
    files = {b"d/a.xmp": os.urandom(3000), b"d/b.xmp": os.urandom(5000)}
    client = FakeClient(files)
    entries = [
        proto.DirEntry(p.rpartition(b"/")[2], client.attr(p), blake3.blake3(d).digest(), d)
        for p, d in files.items()
    ]

    async def body():
        async with trio.open_nursery() as nursery:
            cache = ReadCache(store, client, nursery)
            cache.remember_listing(b"d", entries)
            for path, data in files.items():
                entry = await cache.open(path, client.attr(path))
                assert await entry.read(0, len(data)) == data
                cache.release(entry)
            await cache.wait_stored()
            cache.close()

    run(body)
    assert client.handles == {}  # no open reached the client
    for data in files.values():  # and both are store objects now: the next session's too
        fd = store.open(blake3.blake3(data).digest(), len(data))
        assert fd is not None
        assert os.pread(fd, len(data) + 1, 0) == data
        os.close(fd)


def test_carried_content_that_does_not_match_its_hash_is_not_stored(store: ContentStore):
    data = os.urandom(3000)
    client = FakeClient({b"a": data})
    wrong = blake3.blake3(b"something else").digest()

    async def body():
        async with trio.open_nursery() as nursery:
            cache = ReadCache(store, client, nursery)
            cache.remember_listing(b"", [proto.DirEntry(b"a", client.attr(b"a"), wrong, data)])
            entry = await cache.open(b"a", client.attr(b"a"))
            await trio.testing.wait_all_tasks_blocked()  # the store has looked at it
            await cache.wait_stored()
            with pytest.raises(OSError):
                await entry.wait_complete()
            cache.release(entry)
            cache.close()

    run(body)
    assert store.open(wrong, len(data)) is None
    assert store.open(blake3.blake3(data).digest(), len(data)) is None


def test_carried_content_of_a_changed_file_is_not_used(store: ContentStore):
    old, new = os.urandom(3000), os.urandom(3000)
    client = FakeClient({b"a": new})
    stale = proto.Attr(0o100644, 3000, 0, 0, 0)  # another mtime than the client's now

    async def body():
        async with trio.open_nursery() as nursery:
            cache = ReadCache(store, client, nursery)
            cache.remember_listing(b"", [proto.DirEntry(b"a", stale, None, old)])
            entry = await cache.open(b"a", client.attr(b"a"))
            assert await entry.read(0, 3000) == new
            cache.release(entry)
            await cache.wait_stored()
            cache.close()

    run(body)
    assert list(client.handles.values()) == [b"a"]  # asked the client, as without a listing


def test_content_a_listing_carried_is_stored_if_never_opened(store: ContentStore):
    """The client sends only the hash of such a file from now on: the store must have it."""
    data = os.urandom(3000)
    client = FakeClient({b"a": data})
    digest = blake3.blake3(data).digest()

    async def body():
        async with trio.open_nursery() as nursery:
            cache = ReadCache(store, client, nursery)
            cache.remember_listing(b"", [proto.DirEntry(b"a", client.attr(b"a"), digest, data)])
            await cache.wait_stored()
            cache.close()

    run(body)
    fd = store.open(digest, len(data))
    assert fd is not None
    os.close(fd)
