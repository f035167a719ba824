"""agent/threadstream.py: the ssh channel over blocking fds, moved by threads (what a
Windows agent uses; TOPYAZ_MOUNT_PORTABLE=1 makes a Linux agent use it too).

Each test runs it over real pipes: bytes in order, reads smaller than a chunk, end of
file, large writes both ways at once, send_eof, cancellation losing or tearing nothing,
aclose waking what waits, a closed peer, and a read that never returns not keeping a
process from exiting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import trio

from topyaz_mount.agent import hostos
from topyaz_mount.agent.threadstream import ThreadedStream

BIG = 4 << 20  # far more than a pipe holds (64 KiB here, 1 MiB widened)


class Pipes:
    """A ThreadedStream and the peer's raw ends: ``into`` it, ``out_of`` it."""

    def __init__(self) -> None:
        stream_in, self.into = os.pipe()
        self.out_of, stream_out = os.pipe()
        self.stream = ThreadedStream(stream_in, stream_out)
        self.drained = bytearray()
        self._drainer: threading.Thread | None = None

    def start_draining(self) -> None:
        """Read ``out_of`` to end of file in a thread (``drained`` collects it)."""

        def drain() -> None:
            while data := os.read(self.out_of, 1 << 16):
                self.drained += data

        self._drainer = threading.Thread(target=drain, daemon=True)
        self._drainer.start()

    def wait_drained(self) -> bytes:
        assert self._drainer is not None
        self._drainer.join(20)
        assert not self._drainer.is_alive(), "the stream's write side was never closed"
        return bytes(self.drained)

    def close(self) -> None:
        for fd in (self.into, self.out_of):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipes():
    p = Pipes()
    try:
        yield p
    finally:
        p.close()


def test_bytes_arrive_in_order_and_a_short_read_keeps_the_rest(pipes):
    async def main() -> None:
        os.write(pipes.into, b"hello world")
        assert await pipes.stream.receive_some(5) == b"hello"
        assert await pipes.stream.receive_some(3) == b" wo"
        assert await pipes.stream.receive_some() == b"rld"
        await pipes.stream.aclose()

    trio.run(main)


def test_end_of_file_reads_empty_every_time_then_closed(pipes):
    async def main() -> None:
        os.write(pipes.into, b"last")
        os.close(pipes.into)
        assert await pipes.stream.receive_some() == b"last"
        assert await pipes.stream.receive_some() == b""
        assert await pipes.stream.receive_some() == b""
        await pipes.stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await pipes.stream.receive_some()

    trio.run(main)


def test_large_sends_both_ways_at_once_arrive_whole(pipes):
    outgoing, incoming = os.urandom(BIG), os.urandom(BIG + 12345)
    received = bytearray()

    async def main() -> None:
        pipes.start_draining()
        feeder = threading.Thread(target=_write_all, args=(pipes.into, incoming), daemon=True)
        feeder.start()

        async def receive_all() -> None:
            while len(received) < len(incoming):
                data = await pipes.stream.receive_some(1 << 18)
                assert data
                received.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_all)
            await pipes.stream.send_all(memoryview(outgoing))
        await pipes.stream.send_eof()
        feeder.join(20)
        await pipes.stream.aclose()

    trio.run(main)
    assert received == incoming
    assert pipes.wait_drained() == outgoing


def test_send_eof_comes_after_every_byte_and_ends_sending(pipes):
    async def main() -> None:
        pipes.start_draining()
        await pipes.stream.send_all(b"abc")
        await pipes.stream.send_eof()
        await pipes.stream.send_eof()  # again: nothing more happens
        with pytest.raises(trio.ClosedResourceError):
            await pipes.stream.send_all(b"more")
        await pipes.stream.aclose()

    trio.run(main)
    assert pipes.wait_drained() == b"abc"


def test_a_cancelled_receive_loses_no_bytes(pipes):
    async def main() -> None:
        with trio.move_on_after(0.05) as scope:
            await pipes.stream.receive_some()
        assert scope.cancelled_caught
        os.write(pipes.into, b"data")
        assert await pipes.stream.receive_some() == b"data"
        await pipes.stream.aclose()

    trio.run(main)


def test_a_cancelled_send_still_writes_whole_and_before_the_next(pipes):
    """Nobody reads, so the big write blocks and is cancelled; its thread goes on, and
    the next send and send_eof wait for it: the peer gets both, whole and in order."""
    big = os.urandom(BIG)

    async def main() -> None:
        with trio.move_on_after(0.1) as scope:
            await pipes.stream.send_all(big)
        assert scope.cancelled_caught
        pipes.start_draining()
        await pipes.stream.send_all(b"tail")
        await pipes.stream.send_eof()
        await pipes.stream.aclose()

    trio.run(main)
    assert pipes.wait_drained() == big + b"tail"


def test_aclose_wakes_a_waiting_receive_and_a_blocked_send(pipes):
    big = os.urandom(BIG)
    woken: list[str] = []

    async def main() -> None:
        async def expect_closed(call, *args) -> None:
            with pytest.raises(trio.ClosedResourceError):
                await call(*args)
            woken.append(call.__name__)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_closed, pipes.stream.receive_some)
            nursery.start_soon(expect_closed, pipes.stream.send_all, big)
            await trio.sleep(0.1)  # both blocked: nothing to read, nobody reading
            await pipes.stream.aclose()

    trio.run(main)
    assert sorted(woken) == ["receive_some", "send_all"]
    # The write that was blocked stops at its next step and closes the write side.
    pipes.start_draining()
    got = pipes.wait_drained()
    assert len(got) < len(big) and big.startswith(got)


def test_a_closed_peer_breaks_the_stream_and_it_stays_broken(pipes):
    async def main() -> None:
        os.close(pipes.out_of)
        for _ in range(2):
            with pytest.raises(trio.BrokenResourceError):
                await pipes.stream.send_all(b"x" * 100)
        await pipes.stream.aclose()

    trio.run(main)


def test_two_receives_at_once_are_refused(pipes):
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipes.stream.receive_some)
            await trio.sleep(0.02)
            with pytest.raises(trio.BusyResourceError):
                await pipes.stream.receive_some()
            nursery.cancel_scope.cancel()
        await pipes.stream.aclose()

    trio.run(main)


def test_a_read_that_never_returns_does_not_keep_the_process_alive():
    """stdin stays open and silent: the process still says its word and exits."""
    script = textwrap.dedent(
        """
        import os, trio
        from topyaz_mount.agent.threadstream import ThreadedStream

        async def main():
            stream = ThreadedStream(0, os.dup(1))
            with trio.move_on_after(0.2):
                await stream.receive_some()
            await stream.send_all(b"bye")
            await stream.send_eof()
            await stream.aclose()

        trio.run(main)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        out = proc.stdout.read()  # to end of file: the process has exited
        assert proc.wait(timeout=20) == 0
        assert out == b"bye"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_the_portable_switch_chooses_the_threaded_channel(monkeypatch):
    for value, kind in (("1", ThreadedStream), ("0", trio.StapledStream)):
        monkeypatch.setenv(hostos.PORTABLE_ENV, value)
        r, w = os.pipe()
        stream = hostos.channel(r, w)
        assert isinstance(stream, kind)
        trio.run(stream.aclose)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
