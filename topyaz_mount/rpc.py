"""Many requests in flight over one byte stream, in both directions.

A ``Peer`` owns a trio stream (the ssh pipes on the client, stdin/stdout on the agent).
Outgoing frames queue by priority, so a read the job is waiting for overtakes bulk
prefetch and output data. Incoming calls run as tasks, bounded in number; incoming
notifications are handled in arrival order (output bytes and commit chunks rely on it).

A call's request goes out ahead of bulk data whatever its reply's priority: a prefetch
request queued behind megabytes of output data starved the input transfer of a job that
reads and writes at once (seen: the upload ran at half the link's rate).

Urgent calls have slots of their own, the reader never waits for a slot (only past a
backlog of 4096 unanswered calls), and urgent replies skip the queue's size limit:
otherwise a full queue of bulk replies holds every slot, the reader stops taking
frames, and a lookup the job waits for sits behind all the prefetch requested before
it (seen: a batch job started 5 s late, behind 128 MiB of prefetch on a WAN link).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import proto

log = logging.getLogger(__name__)

CallHandler = Callable[[Any], Awaitable[Any]]
NoticeHandler = Callable[[Any], Awaitable[None]]


class RemoteError(OSError):
    """The peer answered a request with an errno."""


class ConnectionLost(Exception):
    """The stream ended or broke; no reply will come."""


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
        queue_limit: int = 32 << 20,
        max_concurrent_calls: int = 128,
        max_urgent_calls: int = 32,
    ) -> None:
        self._stream = stream
        self._on_call = on_call
        self._on_notice = on_notice
        self._decoder = proto.FrameDecoder()
        if preamble:
            self._decoder.feed(preamble)
        self._pending: dict[int, _Pending] = {}
        self._next_rid = 1
        self._queues: list[deque[bytes]] = [deque(), deque(), deque()]
        self._queued = 0
        self._queue_limit = queue_limit
        self._has_frames = trio.Event()
        self._has_room = trio.Event()
        self._has_room.set()
        self._call_slots = trio.Semaphore(max_concurrent_calls)
        self._urgent_slots = trio.Semaphore(max_urgent_calls)
        # Calls read and not yet answered: only past this many does the reader stop,
        # so a bulk call waiting for a slot never keeps an urgent one behind it unread.
        self._backlog = trio.Semaphore(max(4096, max_concurrent_calls + max_urgent_calls))
        self._closed: BaseException | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
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
                await until_broken(self._read_loop, nursery)
        finally:
            self._lose(error or ConnectionLost("connection closed"))
        if isinstance(error, proto.ProtocolError):
            log.error("protocol error from peer: %s", error)
            raise error

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

    async def _enqueue(self, frame: bytes, prio: int) -> None:
        while (
            prio != proto.PRIO_URGENT and self._queued >= self._queue_limit and self._closed is None
        ):
            self._has_room = trio.Event() if self._has_room.is_set() else self._has_room
            await self._has_room.wait()
        if self._closed is not None:
            raise ConnectionLost(str(self._closed))
        self._queues[min(max(prio, 0), 2)].append(frame)
        self._queued += len(frame)
        self._has_frames.set()

    def _take_batch(self, limit: int = 1 << 20) -> bytes:
        parts: list[bytes] = []
        size = 0
        for queue in self._queues:
            while queue and size < limit:
                frame = queue.popleft()
                parts.append(frame)
                size += len(frame)
            if size >= limit:
                break
        self._queued -= size
        if self._queued < self._queue_limit:
            self._has_room.set()
        return b"".join(parts)

    async def _write_loop(self) -> None:
        while True:
            if not self._queued:
                self._has_frames = trio.Event()
                await self._has_frames.wait()
                if self._closed is not None:
                    return
                continue
            batch = self._take_batch()
            await self._stream.send_all(batch)
            self.bytes_sent += len(batch)

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        for frame in self._decoder.frames():
            await self._dispatch(frame, nursery)
        while True:
            self.idle_since = trio.current_time()
            data = await self._stream.receive_some(1 << 18)
            self.idle_since = None
            if not data:
                return
            self.bytes_received += len(data)
            self._decoder.feed(data)
            for frame in self._decoder.frames():
                await self._dispatch(frame, nursery)

    async def _dispatch(self, frame: Any, nursery: trio.Nursery) -> None:
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
            await self._backlog.acquire()
            nursery.start_soon(self._serve, frame, slots)
        else:
            await self._on_notice(frame.msg)

    async def _serve(self, call: proto.Call, slots: trio.Semaphore) -> None:
        try:
            async with slots:
                await self._answer(call)
        finally:
            self._backlog.release()

    async def _answer(self, call: proto.Call) -> None:
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
