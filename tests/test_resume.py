"""The resumable stream (resume.py): bytes cross a series of transports exactly once."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from topyaz_mount.wire import resume
from topyaz_mount.wire.liveness import Timing

TIMING = Timing(0.2, 1.0)


def _pair() -> tuple[resume.ResumableStream, resume.ResumableStream]:
    return resume.ResumableStream(TIMING, buffer_limit=1 << 20), resume.ResumableStream(
        TIMING, buffer_limit=1 << 20
    )


class _Cut:
    def __init__(self) -> None:
        self.scopes: list[trio.CancelScope] = []

    def cancel(self) -> None:
        for scope in self.scopes:
            scope.cancel()


async def _carry(nursery, a, b) -> _Cut:
    """Both ends over one fresh in-memory transport; ``cancel()`` cuts it."""
    ta, tb = trio.testing.memory_stream_pair()
    cut = _Cut()

    async def run(stream, transport) -> None:
        with trio.CancelScope() as scope:
            cut.scopes.append(scope)
            await stream.run_transport(transport)

    nursery.start_soon(run, a, ta)
    nursery.start_soon(run, b, tb)
    return cut


async def _read(stream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = await stream.receive_some(1 << 16)
        assert data, "EOF before all bytes came"
        got += data
    return bytes(got)


def test_bytes_arrive_once_across_cuts():
    trio.run(_bytes_arrive_once_across_cuts)


async def _bytes_arrive_once_across_cuts():
    payload = random.Random(7).randbytes(5 << 20)
    back = random.Random(8).randbytes(3 << 20)
    a, b = _pair()
    async with trio.open_nursery() as nursery:
        scope = await _carry(nursery, a, b)

        async def send(stream, data) -> None:
            for i in range(0, len(data), 100_000):
                await stream.send_all(data[i : i + 100_000])

        nursery.start_soon(send, a, payload)
        nursery.start_soon(send, b, back)
        results: dict[str, bytes] = {}

        async def read(name, stream, n) -> None:
            results[name] = await _read(stream, n)

        async with trio.open_nursery() as readers:
            readers.start_soon(read, "ab", b, len(payload))
            readers.start_soon(read, "ba", a, len(back))
            for _ in range(4):  # cut the transport a few times mid-transfer
                await trio.sleep(0.05)
                scope.cancel()
                await trio.sleep(0.1)
                scope = await _carry(nursery, a, b)
        assert results["ab"] == payload and results["ba"] == back
        await a.aclose()
        assert await b.receive_some() == b""  # the clean end reaches the peer
        nursery.cancel_scope.cancel()


def test_silent_transport_is_dropped_and_stream_lives_on():
    trio.run(_silent_transport_is_dropped_and_stream_lives_on)


async def _silent_transport_is_dropped_and_stream_lives_on():
    a, b = _pair()
    ta, _silent = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await a.run_transport(ta)  # returns: nothing heard for dead_after
    assert not a.ended
    await a.send_all(b"after")
    async with trio.open_nursery() as nursery:
        await _carry(nursery, a, b)
        assert await _read(b, 5) == b"after"
        nursery.cancel_scope.cancel()


def test_end_is_eof_and_sends_fail():
    trio.run(_end_is_eof_and_sends_fail)


async def _end_is_eof_and_sends_fail():
    a, _ = _pair()
    a.end()
    assert await a.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await a.send_all(b"x")


def test_attach_line_round_trip_and_secret():
    line = resume.Attach(resume.VERSION, "abc123", "ab" * 16).line()
    parsed = resume.Attach.parse(line)
    assert parsed.session_id == "abc123" and parsed.same_secret("ab" * 16)
    assert not parsed.same_secret("cd" * 16)
    for bad in (b"TMRESUME 1 ../x " + b"ab" * 16 + b"\n", b"hello\n", b"TMRESUME 1 a short\n"):
        with pytest.raises(ValueError):
            resume.Attach.parse(bad)


def test_unread_bytes_are_bounded_and_not_silence():
    trio.run(_unread_bytes_are_bounded_and_not_silence)


async def _unread_bytes_are_bounded_and_not_silence():
    """A peer that sends while nobody reads fills at most the buffer; the transport
    stays up (the reader's own wait is not the peer's silence); all bytes arrive."""
    a, b = _pair()
    payload = random.Random(9).randbytes(4 << 20)
    async with trio.open_nursery() as nursery:
        cut = await _carry(nursery, a, b)
        nursery.start_soon(a.send_all, payload)
        await trio.sleep(TIMING.dead_after * 2)  # nobody reads b
        assert len(b._in) <= (1 << 20) + resume.SEGMENT
        assert a.connected and b.connected
        assert await _read(b, len(payload)) == payload
        cut.cancel()
        nursery.cancel_scope.cancel()


def test_a_resume_past_what_was_sent_drops_the_transport():
    trio.run(_a_resume_past_what_was_sent_drops_the_transport)


async def _a_resume_past_what_was_sent_drops_the_transport():
    a, _ = _pair()
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(resume.HEADER.pack(resume.RESUME, 1000, 0))
    with trio.fail_after(5):
        await a.run_transport(ours)  # returns: the transport is given up
    assert not a.ended


# --- the buffers under the stream ------------------------------------------------------


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(0, 200_000)),
            st.tuples(st.just("drop"), st.integers(0, 300_000)),
            st.tuples(st.just("peek"), st.integers(0, 300_000), st.integers(0, 300_000)),
            st.tuples(st.just("take"), st.integers(0, 300_000)),
        ),
        max_size=40,
    )
)
@settings(max_examples=200, deadline=None)
def test_byte_queue_is_a_fifo_of_bytes(ops):
    """Against a plain bytearray: pieces of any size, joined or not, in any order."""
    q = resume.ByteQueue()
    ref = bytearray()
    counter = 0
    for op in ops:
        if op[0] == "append":
            data = bytes((counter + i) % 251 for i in range(op[1]))
            counter += op[1]
            q.append(data)
            ref += data
        elif op[0] == "drop":
            q.drop(op[1])
            del ref[: op[1]]
        elif op[0] == "peek":
            assert q.peek(op[1], op[2]) == bytes(ref[op[1] : op[1] + op[2]])
        else:
            assert q.take(op[1]) == bytes(ref[: op[1]])
            del ref[: op[1]]
        assert len(q) == len(ref)


def test_byte_queue_keeps_small_pieces_together():
    q = resume.ByteQueue()
    for i in range(10_000):
        q.append(bytes([i % 256]) * 10)
    assert len(q._pieces) <= 2  # 100,000 bytes: one joined piece, and the tail
    assert q.peek(99_990, 20) == bytes([9999 % 256]) * 10
