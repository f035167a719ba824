"""Many requests in flight over one byte stream, in both directions.

A ``Peer`` owns a trio stream (the ssh pipes on the client, stdin/stdout on the agent).
Outgoing frames queue by priority, so a read the job is waiting for overtakes bulk
prefetch and output data. Incoming calls run as tasks, bounded in number; incoming
notifications are handled in arrival order (output bytes and commit chunks rely on it).

A call's request goes out ahead of bulk data whatever its reply's priority: a prefetch
request queued behind megabytes of output data starved the input transfer of a job that
reads and writes at once (seen: the upload ran at half the link's rate).

Urgent calls have slots of their own, the reader never waits for a slot, and urgent
replies have room of their own above the bulk queue's limit: otherwise a full queue of
bulk replies holds every slot, the reader stops taking frames, and a lookup the job
waits for sits behind all the prefetch requested before it (seen: a batch job started
5 s late, behind 128 MiB of prefetch on a WAN link).

Memory is bounded whatever the peer does, because the peer may be hostile (a flood of
urgent 4 MiB reads whose replies it never read grew the client past 3 GB). Outgoing
frames wait past ``queue_limit`` (32 MiB; urgent ones past ``memory_limit``, 64 MiB),
and a call's handler runs only once its reply has room, so a reply is never made only
to wait in memory. The reader stops taking frames while the outgoing bytes reach
``memory_limit`` or the calls read and not yet answered reach 4096 or 16 MiB; that is
backpressure on the peer. Only urgent replies, which a working peer drains first, can
fill the queue that far, so bulk replies never stop the reader. While the reader or a
reply waits on these bounds and the peer takes none of our bytes for ``stall_timeout``
(60 s), the connection fails with ``PeerStalled``; a slow peer that keeps reading is
never cut off. At most about 100 MiB is held: the outgoing bound plus one frame
(8 MiB), the unanswered calls plus one frame, and the decoder's partial frame.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from . import proto

if TYPE_CHECKING:
    from .pacing import TokenBucket

log = logging.getLogger(__name__)

CallHandler = Callable[[Any], Awaitable[Any]]
NoticeHandler = Callable[[Any], Awaitable[None]]


STALL_TIMEOUT = 60.0  # a peer that takes none of our bytes this long while we wait is cut off


class RemoteError(OSError):
    """The peer answered a request with an errno."""


class ConnectionLost(Exception):
    """The stream ended or broke; no reply will come."""


class PeerStalled(proto.ProtocolError):
    """The peer sent requests but stopped reading their replies."""


class _Pending:
    __slots__ = ("event", "result", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Peer:
    def __init__(
        self,
        stream: trio.abc.Stream,
        on_call: CallHandler,
        on_notice: NoticeHandler,
        *,
        preamble: bytes = b"",
        calls_sent: int = 0,
        queue_limit: int = 32 << 20,
        memory_limit: int = 64 << 20,
        max_concurrent_calls: int = 128,
        max_urgent_calls: int = 32,
        max_unanswered_calls: int = 4096,
        max_unanswered_bytes: int = 16 << 20,
        stall_timeout: float | None = None,
    ) -> None:
        self._stream = stream
        self._on_call = on_call
        self._on_notice = on_notice
        self._decoder = proto.FrameDecoder()
        if preamble:
            self._decoder.feed(preamble)
        self._pending: dict[int, _Pending] = {}
        # Calls 1 to ``calls_sent`` were written on the stream before this Peer took it
        # (pipelined with the connection, see client.py); ``reply`` waits for theirs.
        for rid in range(1, calls_sent + 1):
            self._pending[rid] = _Pending()
        self._next_rid = calls_sent + 1
        self._queues: list[deque[bytes | bytearray]] = [deque(), deque(), deque()]
        self._queued = 0
        self._sending = 0  # the batch the writer is handing to the stream
        self._queue_limit = queue_limit
        self._memory_limit = max(memory_limit, queue_limit)
        self._has_frames = trio.Event()
        self._has_room = trio.Event()
        self._has_room.set()
        self._call_slots = trio.Semaphore(max_concurrent_calls)
        self._urgent_slots = trio.Semaphore(max_urgent_calls)
        # Calls read and not yet answered: only past this many does the reader stop,
        # so a bulk call waiting for a slot never keeps an urgent one behind it unread.
        self._max_unanswered = max(max_unanswered_calls, max_concurrent_calls + max_urgent_calls)
        self._max_unanswered_bytes = max_unanswered_bytes
        self._unanswered = 0
        self._unanswered_bytes = 0
        self._stall_timeout = STALL_TIMEOUT if stall_timeout is None else stall_timeout
        self._last_sent_at = 0.0
        self._peer_waits = 0  # the reader and replies waiting for room
        self._peer_blocked_since = 0.0
        self._closed: BaseException | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        # A bandwidth limit on what we send (``--bwlimit``; see pacing.py), or None.
        self.pacer: TokenBucket | None = None
        # When the reader began waiting for bytes that have not come (None while it
        # handles what came): liveness.py's measure of the peer's silence.
        self.idle_since: float | None = None

    # --- public ---------------------------------------------------------------------

    async def call(
        self, req: Any, prio: int = proto.PRIO_NORMAL, *, after_bulk: bool = False
    ) -> Any:
        """Send a request and wait for its reply; raises RemoteError or ConnectionLost.

        ``prio`` is the reply's priority. The request itself is small and goes out
        ahead of bulk data, unless ``after_bulk``: it must stay behind the bulk
        notifications sent before it (a commit's end behind its chunks).
        """
        if self._closed is not None:
            raise ConnectionLost(str(self._closed))
        rid = self._next_rid
        self._next_rid += 1
        pending = _Pending()
        self._pending[rid] = pending
        send_prio = prio if after_bulk else min(prio, proto.PRIO_NORMAL)
        try:
            await self._enqueue(proto.encode(proto.Call(rid, prio, req)), send_prio)
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return await self.reply(rid)

    async def reply(self, rid: int) -> Any:
        """The reply to call ``rid``: its result, or RemoteError or ConnectionLost."""
        pending = self._pending[rid]
        try:
            await pending.event.wait()
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def notify(self, msg: Any, prio: int = proto.PRIO_NORMAL) -> None:
        if self._closed is not None:
            raise ConnectionLost(str(self._closed))
        await self._enqueue(proto.encode(proto.Notify(msg)), prio)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def run(self) -> None:
        """Move frames until the stream ends; then fail every pending call.

        A broken or closed stream is the normal way to end and returns quietly; a peer
        that breaks the protocol raises ProtocolError (after the connection is closed).
        """
        error: BaseException | None = None

        async def until_broken(loop: Callable[..., Awaitable[None]], *args: Any) -> None:
            nonlocal error
            try:
                await loop(*args)
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                proto.ProtocolError,
            ) as e:
                error = error or e
            nursery.cancel_scope.cancel()  # one direction ending ends both

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_broken, self._write_loop)
                nursery.start_soon(until_broken, self._watch_stall)
                await until_broken(self._read_loop, nursery)
        finally:
            self._lose(error or ConnectionLost("connection closed"))
        if isinstance(error, proto.ProtocolError):
            log.info("protocol error from peer: %s", error)
            raise error

    @property
    def held_bytes(self) -> int:
        """Outgoing bytes not yet taken by the stream, and calls read but not answered."""
        return self._queued + self._sending + self._unanswered_bytes

    async def drain(self) -> None:
        """Wait until everything queued so far has been handed to the stream."""
        while self._queued and self._closed is None:
            await trio.sleep(0.005)

    # --- internals ------------------------------------------------------------------

    def _lose(self, why: BaseException) -> None:
        if self._closed is None:
            self._closed = why
        for pending in self._pending.values():
            if not pending.event.is_set():
                pending.error = ConnectionLost(str(why) or type(why).__name__)
                pending.event.set()
        self._has_frames.set()
        self._has_room.set()

    def _limit_for(self, prio: int) -> int:
        return self._memory_limit if prio == proto.PRIO_URGENT else self._queue_limit

    def _room_changed(self) -> None:
        self._has_room.set()

    async def _wait_room(self, blocked: Callable[[], bool], *, for_peer: bool = False) -> None:
        """Wait while ``blocked()``. ``for_peer``: the wait is for the peer's own
        requests (the reader, or a reply), which the stall watch counts."""
        if not blocked():
            return
        if for_peer:
            self._peer_waits += 1
            if self._peer_waits == 1:
                self._peer_blocked_since = trio.current_time()
        try:
            while blocked() and self._closed is None:
                if self._has_room.is_set():
                    self._has_room = trio.Event()
                await self._has_room.wait()
        finally:
            if for_peer:
                self._peer_waits -= 1

    async def _watch_stall(self) -> None:
        """Cut the peer off once its requests have waited on our memory bound for
        ``stall_timeout`` while it took none of the bytes we have for it."""
        while True:
            await trio.sleep(self._stall_timeout / 8)
            if not self._peer_waits or not self._queued + self._sending:
                continue
            quiet_since = max(self._peer_blocked_since, self._last_sent_at)
            if trio.current_time() - quiet_since >= self._stall_timeout:
                raise PeerStalled(
                    f"the peer stopped reading our replies ({self.held_bytes >> 20} MiB "
                    f"held for {self._stall_timeout:g} s); giving up"
                )

    async def _enqueue(self, frame: bytes | bytearray, prio: int) -> None:
        limit = self._limit_for(prio)
        await self._wait_room(lambda: self._queued + self._sending >= limit)
        if self._closed is not None:
            raise ConnectionLost(str(self._closed))
        self._queues[min(max(prio, 0), 2)].append(frame)
        self._queued += len(frame)
        self._has_frames.set()

    def _take_batch(self, limit: int = 1 << 20) -> bytes | bytearray:
        parts: list[bytes | bytearray] = []
        size = 0
        for queue in self._queues:
            while queue and size < limit:
                frame = queue.popleft()
                parts.append(frame)
                size += len(frame)
            if size >= limit:
                break
        self._queued -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)  # a chunk: not copied

    async def _write_loop(self) -> None:
        while True:
            if not self._queued:
                self._has_frames = trio.Event()
                await self._has_frames.wait()
                if self._closed is not None:
                    return
                continue
            pacer = self.pacer
            batch = self._take_batch(pacer.quantum if pacer is not None else 1 << 20)
            self._sending = len(batch)
            if pacer is None:
                await self._stream.send_all(batch)
            else:
                await self._send_paced(batch, pacer)
            self._sending = 0
            self._last_sent_at = trio.current_time()
            self.bytes_sent += len(batch)
            self._room_changed()

    async def _send_paced(self, batch: bytes | bytearray, pacer: TokenBucket) -> None:
        """``batch`` a piece at a time, each when the bucket allows (``--bwlimit``)."""
        view = memoryview(batch)
        for start in range(0, len(batch), pacer.quantum):
            piece = view[start : start + pacer.quantum]
            await trio.sleep(pacer.delay(len(piece), trio.current_time()))
            await self._stream.send_all(piece)
            self._last_sent_at = trio.current_time()  # a slow sender is not a stalled one

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        for frame, size in self._decoder.sized_frames():
            await self._dispatch(frame, size, nursery)
        while True:
            self.idle_since = trio.current_time()
            data = await self._stream.receive_some(1 << 18)
            self.idle_since = None
            if not data:
                return
            self.bytes_received += len(data)
            self._decoder.feed(data)
            for frame, size in self._decoder.sized_frames():
                await self._dispatch(frame, size, nursery)

    def _reader_blocked(self) -> bool:
        return (
            self._queued + self._sending >= self._memory_limit
            or self._unanswered >= self._max_unanswered
            or self._unanswered_bytes >= self._max_unanswered_bytes
        )

    async def _dispatch(self, frame: Any, size: int, nursery: trio.Nursery) -> None:
        if isinstance(frame, proto.Reply | proto.Fail):
            pending = self._pending.get(frame.rid)
            if pending is None:
                return  # the caller gave up (cancelled); drop the late reply
            if isinstance(frame, proto.Reply):
                pending.result = frame.res
            else:
                pending.error = RemoteError(frame.errno, frame.message)
            pending.event.set()
        elif isinstance(frame, proto.Call):
            slots = self._urgent_slots if frame.prio == proto.PRIO_URGENT else self._call_slots
            await self._wait_room(self._reader_blocked, for_peer=True)
            self._unanswered += 1
            self._unanswered_bytes += size
            nursery.start_soon(self._serve, frame, size, slots)
        else:
            await self._on_notice(frame.msg)

    async def _serve(self, call: proto.Call, size: int, slots: trio.Semaphore) -> None:
        try:
            async with slots:
                await self._answer(call)
        finally:
            self._unanswered -= 1
            self._unanswered_bytes -= size
            self._room_changed()

    async def _answer(self, call: proto.Call) -> None:
        # The reply's room first: a reply made before there is room would wait in memory.
        limit = self._limit_for(call.prio)
        await self._wait_room(lambda: self._queued + self._sending >= limit, for_peer=True)
        if self._closed is not None:
            return
        try:
            res = await self._on_call(call.req)
            frame = proto.encode(proto.Reply(call.rid, res))
        except OSError as e:
            code = e.errno or errno_mod.EIO
            frame = proto.encode(proto.Fail(call.rid, code, e.strerror or os.strerror(code)))
        except proto.ProtocolError as e:  # the reply is too big for a frame
            frame = proto.encode(proto.Fail(call.rid, errno_mod.EFBIG, str(e)))
        except Exception as e:  # a handler bug must not end the connection
            log.exception("handler for %s failed", type(call.req).__name__)
            frame = proto.encode(proto.Fail(call.rid, errno_mod.EIO, f"{type(e).__name__}: {e}"))
        try:
            await self._enqueue(frame, call.prio)
        except ConnectionLost:
            pass
