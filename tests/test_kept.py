"""kept/: the manifest of a failed session's outputs, and its share of the cache cap."""

from __future__ import annotations

import json
import os
import time

import blake3
import trio
import trio.testing

from topyaz_mount.agent import kept
from topyaz_mount.agent.store import ContentStore
from topyaz_mount.wire import liveness, proto
from topyaz_mount.wire.rpc import Peer


def _fd_with(tmp_path, name: str, data: bytes) -> int:
    path = tmp_path / name
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_manifest_says_complete_or_partial_with_size_hash_and_root(tmp_path):
    base = tmp_path / "cache"
    session = kept.KeptSession(base, "s1", "/home/me/photos")
    whole, half = os.urandom(300_000), os.urandom(1000)
    expect = proto.Attr(0o100644, 5, 123, 0, 0)
    for name, data, complete in (("out/a.bin", whole, True), ("out/b.bin", half, False)):
        fd = _fd_with(tmp_path, name.replace("/", "_"), data)
        try:
            dest = session.keep(
                name.encode(), fd, complete=complete, mode=0o644, expect=expect, reason="x"
            )
        finally:
            os.close(fd)
        assert dest.read_bytes() == data
    manifest = json.loads((base / "kept" / "s1" / "manifest.json").read_text())
    assert manifest["root"] == "/home/me/photos" and manifest["session"] == "s1"
    files = {e["path"]: e for e in manifest["files"]}
    assert files["out/a.bin"]["complete"] is True
    assert files["out/a.bin"]["size"] == len(whole)
    assert files["out/a.bin"]["blake3"] == blake3.blake3(whole).hexdigest()
    assert files["out/a.bin"]["expect"] == [5, 123]
    assert files["out/b.bin"]["complete"] is False
    [info] = kept.list_all(base)
    assert info.session == "s1" and info.bytes == len(whole) + len(half) + _manifest_size(base)


def _manifest_size(base) -> int:
    return (base / "kept" / "s1" / "manifest.json").stat().st_size


def _kept_session(base, sid: str, size: int, created: float) -> None:
    session = kept.KeptSession(base, sid, "/r")
    session.created = created
    path = base / f"src-{sid}"
    path.write_bytes(b"k" * size)
    fd = os.open(path, os.O_RDONLY)
    try:
        session.keep(b"out.bin", fd, complete=True, mode=0o644, expect=None, reason="x")
    finally:
        os.close(fd)
    path.unlink()


def _add_object(store: ContentStore, data: bytes) -> tuple[bytes, int]:
    """Add an object; returns its digest and the fd that holds it (in use while open)."""
    fd, temp = store.new_temp(len(data))
    os.pwrite(fd, data, 0)
    return store.add(temp, fd, None), fd


def test_kept_counts_against_the_cap_objects_go_first_then_oldest_kept(tmp_path):
    base = tmp_path / "cache"
    base.mkdir()
    now = time.time()
    _kept_session(base, "old", 40_000, now - 100)
    _kept_session(base, "new", 40_000, now - 10)
    _kept_session(base, "live", 40_000, now - 200)
    (base / "sessions" / "live").mkdir(parents=True)  # still running: never evicted
    store = ContentStore(base, cap=150_000)
    unused, fd = _add_object(store, os.urandom(20_000))
    os.close(fd)
    # 120 kB kept + a 20 kB object fit under 150 kB: nothing goes
    assert {k.session for k in kept.list_all(base)} == {"old", "new", "live"}
    assert store.has(unused, 20_000)
    # a 40 kB object in use: over the cap. The object nobody holds goes first, then
    # the oldest kept session that is not running ("old"), and that is enough.
    held, fd = _add_object(store, os.urandom(40_000))
    try:
        assert not store.has(unused, 20_000)
        assert store.has(held, 40_000)
        assert {k.session for k in kept.list_all(base)} == {"new", "live"}
    finally:
        os.close(fd)
    assert store.stats().kept_bytes == kept.total_bytes(base)
    assert kept.remove(base, "new") > 40_000
    assert {k.session for k in kept.list_all(base)} == {"live"}
    assert kept.remove(base) == 0  # clearing all leaves a running session's alone
    assert {k.session for k in kept.list_all(base)} == {"live"}


def test_a_silent_peer_is_declared_dead_a_busy_reader_is_not():
    """The watcher fires after the peer's silence, not while our own reader is held up."""

    async def main() -> None:
        left, right = trio.testing.memory_stream_pair()
        timing = liveness.Timing(0.05, 0.3)
        silent: list[float] = []

        async def ignore(_: object) -> None:
            return None

        async def on_silent(seconds: float) -> None:
            silent.append(seconds)

        a = Peer(left, ignore, ignore)
        b = Peer(right, ignore, ignore)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            nursery.start_soon(liveness.watch, b, timing, on_silent)
            # a pings b: b never finds it silent
            nursery.start_soon(liveness.watch, a, timing, on_silent)
            await trio.sleep(1.0)
            assert silent == []
            nursery.cancel_scope.cancel()

        left, right = trio.testing.memory_stream_pair()
        b = Peer(right, ignore, ignore)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.run)
            with trio.fail_after(5):
                await liveness.watch(b, timing, on_silent)  # nobody at the other end
            assert silent and silent[0] >= timing.dead_after
            nursery.cancel_scope.cancel()

    trio.run(main)
