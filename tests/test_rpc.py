"""rpc.py: two Peers over an in-memory stream pair."""

from __future__ import annotations

import errno
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from topyaz_mount.wire import proto
from topyaz_mount.wire.rpc import ConnectionLost, Peer, PeerStalled, RemoteError

TIMEOUT = 5


def run(fn, *args):
    """Run an async test body under trio with an overall deadline."""

    async def main():
        with trio.fail_after(TIMEOUT):
            return await fn(*args)

    return trio.run(main)


def leaves(exc: BaseException) -> list[BaseException]:
    subs = getattr(exc, "exceptions", None)
    if subs is None:
        return [exc]
    return [leaf for sub in subs for leaf in leaves(sub)]


async def _no_calls(req):
    raise OSError(errno.ENOSYS, "no calls here")


async def _ignore(msg):
    pass


class Side:
    """One Peer plus what it saw."""

    def __init__(self, stream, on_call=None, on_notice=None, **kw) -> None:
        self.notices: list = []
        self.on_call = on_call or _no_calls

        async def record(msg):
            self.notices.append(msg)
            if on_notice is not None:
                await on_notice(msg)

        self.peer = Peer(stream, self.on_call, record, **kw)
        self.stream = stream
        self.run_error: BaseException | None = None
        self.run_done = trio.Event()

    async def run(self) -> None:
        try:
            await self.peer.run()
        except BaseException as e:  # noqa: BLE001  (recorded for the test to inspect)
            self.run_error = e
            if isinstance(e, trio.Cancelled):
                raise
        finally:
            self.run_done.set()


@asynccontextmanager
async def pair(
    a_call=None, b_call=None, a_notice=None, b_notice=None, a_kw=None, b_kw=None, start=True
) -> AsyncIterator[tuple[Side, Side, trio.Nursery]]:
    sa, sb = trio.testing.memory_stream_pair()
    a = Side(sa, a_call, a_notice, **(a_kw or {}))
    b = Side(sb, b_call, b_notice, **(b_kw or {}))
    async with trio.open_nursery() as nursery:
        if start:
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
        yield a, b, nursery
        nursery.cancel_scope.cancel()


# --- calls ---------------------------------------------------------------------------


async def _echo_size(req):
    """Answer a Stat with an Attr that encodes the path, after a random delay."""
    await trio.sleep(random.random() * 0.01)
    return proto.AttrReply(proto.Attr(0o100644, len(req.path), int(req.path), 0, 0))


def test_concurrent_calls_in_both_directions():
    async def body():
        async with pair(a_call=_echo_size, b_call=_echo_size) as (a, b, _):
            results: dict[tuple[str, int], proto.AttrReply] = {}

            async def one(side_name, peer, i):
                results[side_name, i] = await peer.call(proto.Stat(str(i).encode()))

            async with trio.open_nursery() as n:
                for i in range(60):
                    n.start_soon(one, "a", a.peer, i)
                    n.start_soon(one, "b", b.peer, 1000 + i)
            assert len(results) == 120
            for (_, i), res in results.items():
                assert isinstance(res, proto.AttrReply)
                assert res.attr.mtime_ns == i
                assert res.attr.size == len(str(i))
            assert a.peer.bytes_sent == b.peer.bytes_received
            assert b.peer.bytes_sent == a.peer.bytes_received

    run(body)


def test_a_call_can_be_answered_by_calling_back():
    """A handler may itself call the other side (the agent asks while we ask)."""

    async def body():
        async def b_call(req):
            inner = await b_peer_holder[0].call(proto.ReadLink(b"x"))
            return proto.LinkTarget(inner.target + b"!")

        async def a_call(req):
            return proto.LinkTarget(b"answer")

        b_peer_holder = []
        async with pair(a_call=a_call, b_call=b_call) as (a, b, _):
            b_peer_holder.append(b.peer)
            res = await a.peer.call(proto.ReadLink(b"y"))
            assert res == proto.LinkTarget(b"answer!")

    run(body)


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (FileNotFoundError(errno.ENOENT, "no such thing"), errno.ENOENT, "no such thing"),
        (PermissionError(errno.EACCES, "nope"), errno.EACCES, "nope"),
        (OSError(errno.ENOSPC, "disk full"), errno.ENOSPC, "disk full"),
        (OSError("no errno at all"), errno.EIO, None),
        (ValueError("handler bug"), errno.EIO, "ValueError: handler bug"),
        (KeyError("k"), errno.EIO, None),
    ],
)
def test_errors_cross_as_errno(exc, code, message):
    async def body():
        async def fail(req):
            raise exc

        async with pair(b_call=fail, b_kw={}) as (a, b, _):
            with pytest.raises(RemoteError) as e:
                await a.peer.call(proto.Stat(b"x"))
            assert isinstance(e.value, OSError)
            assert e.value.errno == code
            if message is not None:
                assert e.value.strerror == message
            # the connection survives a failed call
            assert not a.peer.closed and not b.peer.closed
        return True

    assert run(body)


def test_connection_survives_handler_bugs():
    async def body():
        calls = 0

        async def flaky(req):
            nonlocal calls
            calls += 1
            if calls % 2:
                raise RuntimeError("boom")
            return proto.Done()

        async with pair(b_call=flaky) as (a, b, _):
            for i in range(6):
                if i % 2 == 0:
                    with pytest.raises(RemoteError):
                        await a.peer.call(proto.Bye())
                else:
                    assert await a.peer.call(proto.Bye()) == proto.Done()

    run(body)


# --- connection loss -----------------------------------------------------------------


def test_pending_call_gets_connection_lost_when_the_other_side_goes_away():
    async def body():
        entered = trio.Event()

        async def never(req):
            entered.set()
            await trio.sleep_forever()

        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        b = Side(sb, never)
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            b_scope = trio.CancelScope()
            n.start_soon(_run_in_scope, b, b_scope)
            outcome: list = []

            async def caller():
                try:
                    outcome.append(await a.peer.call(proto.Stat(b"x")))
                except BaseException as e:
                    outcome.append(e)

            n.start_soon(caller)
            await entered.wait()
            b_scope.cancel()
            await b.run_done.wait()
            await sb.aclose()  # the other end is gone: a reads EOF
            await a.run_done.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost)
            assert a.run_error is None  # EOF is a normal end
            assert a.peer.closed
            with pytest.raises(ConnectionLost):
                await a.peer.call(proto.Stat(b"x"))
            with pytest.raises(ConnectionLost):
                await a.peer.notify(proto.Log("info", "x"))

    run(body)


async def _run_in_scope(side: Side, scope: trio.CancelScope) -> None:
    with scope:
        await side.run()


def test_raw_eof_fails_every_pending_call():
    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            errors: list = []

            async def caller(i):
                try:
                    await a.peer.call(proto.Stat(b"%d" % i))
                except ConnectionLost as e:
                    errors.append(e)

            for i in range(10):
                n.start_soon(caller, i)
            # read the ten calls off the wire, then hang up without answering
            dec = proto.FrameDecoder()
            got: list = []
            while len(got) < 10:
                dec.feed(await sb.receive_some())
                got += dec.frames()
            assert sorted(f.req.path for f in got) == sorted(b"%d" % i for i in range(10))
            assert len({f.rid for f in got}) == 10
            await sb.aclose()
        assert len(errors) == 10

    run(body)


def test_garbage_from_the_peer_ends_the_connection_with_a_protocol_error():
    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            lost: list = []

            async def caller():
                try:
                    await a.peer.call(proto.Stat(b"x"))
                except ConnectionLost as e:
                    lost.append(e)

            n.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            await sb.send_all(b"\x00\x00\x00\x03abc")
            await a.run_done.wait()
        assert lost, "the pending call must fail"
        assert a.peer.closed
        assert any(isinstance(e, proto.ProtocolError) for e in leaves(a.run_error))

    run(body)


def test_garbage_makes_run_raise_a_bare_protocol_error():
    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            await sb.send_all(b"\x00\x00\x00\x03abc")
            await a.run_done.wait()
        assert isinstance(a.run_error, proto.ProtocolError), repr(a.run_error)

    run(body)


@pytest.mark.parametrize("how", ["own-end-closed", "other-end-stops-reading"])
def test_broken_stream_ends_run_quietly(how):
    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            await trio.testing.wait_all_tasks_blocked()
            if how == "own-end-closed":
                await sa.aclose()
            else:
                await sb.receive_stream.aclose()
                with pytest.raises((ConnectionLost, trio.BrokenResourceError)):
                    for _ in range(3):
                        await a.peer.notify(proto.Log("info", "x"))
                        await trio.testing.wait_all_tasks_blocked()
            await a.run_done.wait()
        assert a.peer.closed
        assert a.run_error is None, repr(a.run_error)

    run(body)


def test_oversize_reply_fails_that_call_only():
    async def body():
        async def huge(req):
            if isinstance(req, proto.ListDir):
                name = b"n" * 200
                attr = proto.Attr(0o100644, 1, 1, 1, 1)
                return proto.Listing([proto.DirEntry(name, attr)] * 40_000)  # ~9 MB
            return proto.Done()

        async with pair(b_call=huge) as (a, b, _):
            with trio.fail_after(1), pytest.raises(RemoteError):
                await a.peer.call(proto.ListDir(b""))
            assert not b.peer.closed
            assert await a.peer.call(proto.Bye()) == proto.Done()

    run(body)


# --- notifications -------------------------------------------------------------------


def test_notifications_arrive_in_order_even_with_a_slow_handler():
    async def body():
        async def slow(msg):
            await trio.sleep(random.random() * 0.002)

        async with pair(b_notice=slow) as (a, b, _):
            sent = [
                proto.Output(1, 1 + i % 2, bytes([i % 256]) * (i * 37 % 3000)) for i in range(200)
            ]
            for m in sent:
                await a.peer.notify(m)
            await a.peer.drain()
            with trio.fail_after(TIMEOUT):
                while len(b.notices) < len(sent):
                    await trio.sleep(0.001)
            assert b.notices == sent

    run(body)


def test_calls_and_notices_interleave_but_notices_keep_order():
    async def body():
        async with pair(b_call=_echo_size) as (a, b, _):
            async with trio.open_nursery() as n:
                for i in range(20):
                    n.start_soon(a.peer.call, proto.Stat(b"%d" % i))
                    await a.peer.notify(proto.CommitChunk(1, i, b"x"))
            await a.peer.drain()
            await trio.testing.wait_all_tasks_blocked()
            assert [m.offset for m in b.notices] == list(range(20))

    run(body)


# --- priorities and flow control -----------------------------------------------------


def test_urgent_frames_overtake_queued_bulk_frames():
    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        b = Side(sb)
        plan = [
            (proto.PRIO_BULK, "bulk0"),
            (proto.PRIO_NORMAL, "normal0"),
            (proto.PRIO_BULK, "bulk1"),
            (proto.PRIO_URGENT, "urgent0"),
            (proto.PRIO_NORMAL, "normal1"),
            (proto.PRIO_URGENT, "urgent1"),
            (99, "clamped-to-bulk"),
            (-5, "clamped-to-urgent"),
        ]
        # queue everything before a's writer runs
        for prio, text in plan:
            await a.peer.notify(proto.Log("info", text), prio)
        async with trio.open_nursery() as n:
            n.start_soon(b.run)
            n.start_soon(a.run)
            await a.peer.drain()
            while len(b.notices) < len(plan):
                await trio.sleep(0.001)
            n.cancel_scope.cancel()
        assert [m.text for m in b.notices] == [
            "urgent0",
            "urgent1",
            "clamped-to-urgent",
            "normal0",
            "normal1",
            "bulk0",
            "bulk1",
            "clamped-to-bulk",
        ]

    run(body)


def test_call_priority_orders_queued_calls():
    """Urgent requests go first; a request whose reply is bulk still goes out ahead of
    bulk data queued before it (a prefetch request must not wait behind megabytes of
    output); one sent ``after_bulk`` (a commit's end) stays behind it."""

    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        async with trio.open_nursery() as n:
            steps = [
                lambda: a.peer.notify(proto.CommitChunk(1, 0, b"x" * 100), proto.PRIO_BULK),
                lambda: a.peer.call(proto.Stat(b"bulk reply"), proto.PRIO_BULK),
                lambda: a.peer.call(proto.Stat(b"commit end"), proto.PRIO_BULK, after_bulk=True),
                lambda: a.peer.call(proto.Stat(b"urgent"), proto.PRIO_URGENT),
            ]
            for step in steps:  # queued one after the other, in this order
                n.start_soon(step)
                await trio.testing.wait_all_tasks_blocked()
            n.start_soon(a.run)
            dec = proto.FrameDecoder()
            got: list = []
            while len(got) < 4:
                dec.feed(await sb.receive_some())
                got += dec.frames()
            seen = [
                (f.req.path, f.prio) if isinstance(f, proto.Call) else type(f.msg).__name__
                for f in got
            ]
            assert seen == [
                (b"urgent", proto.PRIO_URGENT),
                (b"bulk reply", proto.PRIO_BULK),
                "CommitChunk",
                (b"commit end", proto.PRIO_BULK),
            ]
            n.cancel_scope.cancel()

    run(body)


class GatedSend(trio.abc.SendStream):
    """A send stream that holds every send_all until ``gate`` is set."""

    def __init__(self, inner: trio.abc.SendStream) -> None:
        self.inner = inner
        self.gate = trio.Event()
        self.entered = trio.Event()

    async def send_all(self, data) -> None:
        self.entered.set()
        await self.gate.wait()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_reply_goes_out_at_the_priority_of_its_call():
    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        gated = GatedSend(sa.send_stream)
        a = Side(trio.StapledStream(gated, sa.receive_stream), _answer_path)
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            # the writer takes this frame and then waits at the gate
            await a.peer.notify(proto.Log("info", "blocker"))
            await gated.entered.wait()
            await sb.send_all(
                proto.encode(proto.Call(1, proto.PRIO_BULK, proto.ReadLink(b"bulk")))
                + proto.encode(proto.Call(2, proto.PRIO_NORMAL, proto.ReadLink(b"normal")))
                + proto.encode(proto.Call(3, proto.PRIO_URGENT, proto.ReadLink(b"urgent")))
            )
            await trio.testing.wait_all_tasks_blocked()  # all three replies queued
            gated.gate.set()
            dec = proto.FrameDecoder()
            got: list = []
            while len(got) < 4:
                dec.feed(await sb.receive_some())
                got += dec.frames()
            assert isinstance(got[0], proto.Notify)
            assert [(f.rid, f.res.target) for f in got[1:]] == [
                (3, b"urgent"),
                (2, b"normal"),
                (1, b"bulk"),
            ]
            n.cancel_scope.cancel()

    run(body)


async def _answer_path(req):
    return proto.LinkTarget(req.path)


def test_backpressure_with_a_tiny_queue_loses_nothing():
    async def body():
        async with pair(a_kw={"queue_limit": 64}) as (a, b, _):
            sent = [proto.StdinData(1, bytes([i]) * 50) for i in range(100)]
            for m in sent:
                await a.peer.notify(m)
            await a.peer.drain()
            while len(b.notices) < len(sent):
                await trio.sleep(0.001)
            assert b.notices == sent

    run(body)


def test_incoming_calls_are_bounded():
    async def body():
        active = 0
        peak = 0

        async def busy(req):
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await trio.sleep(0.005)
            active -= 1
            return proto.Done()

        async with (
            pair(b_call=busy, b_kw={"max_concurrent_calls": 3}) as (a, b, _),
            trio.open_nursery() as n,
        ):
            for _ in range(20):
                n.start_soon(a.peer.call, proto.Bye())
        assert peak == 3

    run(body)


def test_cancelled_call_drops_its_late_reply():
    async def body():
        release = trio.Event()

        async def slow(req):
            if req.path == b"slow":
                await release.wait()
            return proto.AttrReply(proto.Attr(0, 0, 0, 0, 0))

        async with pair(b_call=slow) as (a, b, _):
            with trio.move_on_after(0.05) as scope:
                await a.peer.call(proto.Stat(b"slow"))
            assert scope.cancelled_caught
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert not a.peer.closed
            assert await a.peer.call(proto.Stat(b"fast")) == proto.AttrReply(
                proto.Attr(0, 0, 0, 0, 0)
            )
            assert a.peer._pending == {}  # noqa: SLF001

    run(body)


def test_preamble_frames_are_dispatched_first():
    """Frames that arrived together with MAGIC are handed to the Peer as its preamble."""

    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        early = proto.encode(proto.Notify(proto.Log("info", "early"))) + proto.encode(
            proto.Notify(proto.Log("info", "second"))
        )
        a = Side(sa, preamble=early[:-3])
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            await sb.send_all(early[-3:] + proto.encode(proto.Notify(proto.Log("info", "late"))))
            while len(a.notices) < 3:
                await trio.sleep(0.001)
            assert [m.text for m in a.notices] == ["early", "second", "late"]
            n.cancel_scope.cancel()

    run(body)


def test_reply_to_unknown_rid_is_ignored():
    async def body():
        sa, sb = trio.testing.memory_stream_pair()
        a = Side(sa)
        async with trio.open_nursery() as n:
            n.start_soon(a.run)
            await sb.send_all(
                proto.encode(proto.Reply(12345, proto.Done()))
                + proto.encode(proto.Fail(777, errno.EIO, "late"))
                + proto.encode(proto.Notify(proto.Log("info", "still here")))
            )
            while not a.notices:
                await trio.sleep(0.001)
            assert not a.peer.closed
            n.cancel_scope.cancel()

    run(body)


def test_an_urgent_call_is_served_while_bulk_calls_hold_every_slot():
    """Bulk calls blocked on a full outgoing queue must not hold up an urgent one."""

    async def body():
        release = trio.Event()

        async def serve(req):
            if isinstance(req, proto.Stat) and req.path == b"urgent":
                return proto.AttrReply(proto.Attr(0o100644, 1, 0, 0, 0))
            await release.wait()  # bulk: stuck, as behind a full queue
            return proto.Done()

        async with (
            pair(b_call=serve, b_kw={"max_concurrent_calls": 2}) as (a, b, _),
            trio.open_nursery() as n,
        ):
            for _ in range(5):  # more than the slots: the reader would block on these
                n.start_soon(a.peer.call, proto.Bye(), proto.PRIO_BULK)
            await trio.sleep(0.05)
            res = await a.peer.call(proto.Stat(b"urgent"), proto.PRIO_URGENT)
            assert res.attr.size == 1
            release.set()

    run(body)


def test_urgent_replies_skip_a_full_queue():
    async def body():
        async def serve(req):
            return proto.AttrReply(proto.Attr(0o100644, 7, 0, 0, 0))

        async with pair(b_call=serve, b_kw={"queue_limit": 1}) as (a, b, _):
            b.peer._queued = 10  # as if bulk frames filled the queue
            res = await a.peer.call(proto.Stat(b"x"), proto.PRIO_URGENT)
            assert res.attr.size == 7
            b.peer._queued = 0

    run(body)


# --- the memory bound -------------------------------------------------------------------


def _socket_pair():
    import socket

    a, b = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def _big_reply(req):
    return proto.Data(b"x" * (256 << 10))


def _flood_frames(n: int) -> bytes:
    read = proto.ReadChunk(1, 0, 256 << 10)
    return b"".join(proto.encode(proto.Call(rid, proto.PRIO_URGENT, read)) for rid in range(n))


def test_urgent_replies_stop_the_reader_at_the_bound_and_a_peer_that_never_reads_is_cut_off():
    async def body():
        ours, theirs = _socket_pair()
        peer = Peer(
            ours, _big_reply, _ignore, queue_limit=1 << 20, memory_limit=2 << 20, stall_timeout=0.5
        )
        peak = 0
        failure: list[BaseException] = []

        async def run_peer():
            try:
                await peer.run()
            except PeerStalled as e:
                failure.append(e)

        async with trio.open_nursery() as n:
            n.start_soon(run_peer)
            await theirs.send_all(_flood_frames(400))  # 100 MiB of replies asked for
            while not peer.closed:
                peak = max(peak, peer.held_bytes)
                await trio.sleep(0.001)
        assert "stopped reading our replies" in str(failure[0])
        # the bound, one reply over it (made before the stream took the last), the calls
        assert 0 < peak <= (2 << 20) + (257 << 10) + (16 << 20)

    run(body)


def test_a_slow_peer_that_keeps_reading_is_never_cut_off():
    """Backpressure, not failure: the stall deadline runs only while nothing is taken."""

    async def body():
        ours, theirs = _socket_pair()
        peer = Peer(
            ours, _big_reply, _ignore, queue_limit=1 << 20, memory_limit=2 << 20, stall_timeout=0.5
        )
        n_calls = 40  # 10 MiB of replies, five times the bound
        async with trio.open_nursery() as n:
            n.start_soon(peer.run)
            await theirs.send_all(_flood_frames(n_calls))
            decoder = proto.FrameDecoder()
            replies = 0
            while replies < n_calls:
                await trio.sleep(0.05)  # a slow link: 256 KiB every 50 ms
                decoder.feed(await theirs.receive_some(256 << 10))
                replies += len(decoder.frames())
            assert not peer.closed
            n.cancel_scope.cancel()

    run(body)
