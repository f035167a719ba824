"""A byte stream that outlives its transport (issue 14).

Each side numbers the bytes it sends, keeps them until the peer acknowledges them,
and after a reconnect sends again from where the peer says it got to. ``rpc.Peer``
runs on top of it, so neither the Peer nor the session above it sees an outage: a
request in flight, a commit's chunks, a job's output and its exit status all arrive
exactly once and in order once a new transport is attached. That is what makes every
resent request idempotent: nothing is resent above this layer.

On a transport the bytes travel as segments: a 13-byte header (kind, offset, length)
and, for DATA, the bytes. Each new transport starts with both sides sending RESUME
(how far they have received); each then sends again from the offset the other named.
ACK frees the sender's buffer; PING keeps an idle transport audibly alive; CLOSE is
the clean end (a transport that just ends is an outage, not an end).

Liveness lives here, not in ``liveness.watch``: a transport silent for ``dead_after``
is dropped (the client reconnects, the agent waits for it), while the Peer above
sees only a pause.

The attach line (``attach_line``) goes first on every new connection, ahead of the
segments: protocol version, session id and the session secret only the client knows.
"""

from __future__ import annotations

import hmac
import logging
import re
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from .liveness import Timing

log = logging.getLogger(__name__)

VERSION = 1
HEADER = struct.Struct(">BQI")
DATA, ACK, PING, CLOSE, RESUME = range(5)
SEGMENT = 256 << 10
SEND_APART = 16 << 10  # segments this big go out as header, then data: no copy
BUFFER_LIMIT = 32 << 20  # bytes sent and not yet acknowledged; send_all waits past it
ATTACH_MAX = 256
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ATTACH = re.compile(rb"^TMRESUME (\d+) ([A-Za-z0-9_-]{1,64}) ([0-9a-f]{32,128})( new)?$")
OK_LINE = b"TMRESUME OK\n"
REFUSED_PREFIX = b"TMRESUME NO "


class TransportLost(Exception):
    """The current transport ended or went silent; the stream itself lives on."""


@dataclass(frozen=True)
class Attach:
    version: int
    session_id: str
    secret: str
    # A new client process (``topyaz-mount attach``): a new stream, not a resumed one.
    fresh: bool = False

    def line(self) -> bytes:
        new = " new" if self.fresh else ""
        return f"TMRESUME {self.version} {self.session_id} {self.secret}{new}\n".encode()

    @classmethod
    def parse(cls, line: bytes) -> Attach:
        m = _ATTACH.match(line.rstrip(b"\n"))
        if not m:
            raise ValueError("not an attach line")
        return cls(int(m[1]), m[2].decode(), m[3].decode(), bool(m[4]))

    def same_secret(self, other: str) -> bool:
        return hmac.compare_digest(self.secret.encode(), other.encode())


async def read_line(stream: trio.abc.ReceiveStream, limit: int = ATTACH_MAX) -> bytes:
    """One line, byte by byte (nothing after it is consumed); b"" at EOF."""
    line = bytearray()
    while len(line) < limit:
        data = await stream.receive_some(1)
        if not data:
            return b""
        line += data
        if data == b"\n":
            return bytes(line)
    raise ValueError("line too long")


class ByteQueue:
    """A FIFO of bytes, kept as the pieces it was given (small ones joined).

    A bytearray appended to at the end and cut at the front was copied whole again and
    again: CPython moves a bytearray whose front was cut every time it grows. With 32 MiB
    in flight that was most of the agent's CPU while 1 GiB of output went home (an
    18.5 s stage job that rsync staging does in 4.5-6.7 s)."""

    JOIN_BELOW = 64 << 10  # smaller pieces go into one until it reaches this

    def __init__(self) -> None:
        self._pieces: deque[bytes | bytearray] = deque()
        self._tail = bytearray()  # small pieces not yet joined into one
        self._skip = 0  # bytes of the first piece already dropped
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self._size += n
        if n < self.JOIN_BELOW:
            self._tail += data
            if len(self._tail) >= self.JOIN_BELOW:
                self._close_tail()
            return
        self._close_tail()
        # Kept as it is, not copied: the stream's writer (the Peer) never changes a
        # buffer it has sent. A view may be of something that changes: copied.
        self._pieces.append(bytes(data) if isinstance(data, memoryview) else data)

    def _close_tail(self) -> None:
        if self._tail:
            self._pieces.append(bytes(self._tail))
            self._tail = bytearray()

    def peek(self, start: int, n: int) -> bytes | bytearray | memoryview:
        """Up to ``n`` bytes from ``start`` bytes past the front (a view where they
        lie in one piece: a segment cut from a megabyte chunk is not copied)."""
        self._close_tail()
        start += self._skip
        parts: list[bytes | bytearray | memoryview] = []
        for piece in self._pieces:
            if start >= len(piece):
                start -= len(piece)
                continue
            part = memoryview(piece)[start : start + n] if start or n < len(piece) else piece
            parts.append(part)
            n -= len(part)
            start = 0
            if not n:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drop(self, n: int) -> None:
        """Forget the first ``n`` bytes."""
        n = min(n, self._size)
        self._size -= n
        while n:
            if not self._pieces:
                self._close_tail()  # only then: small pieces stay joined meanwhile
            left = len(self._pieces[0]) - self._skip
            if n < left:
                self._skip += n
                return
            self._pieces.popleft()
            self._skip = 0
            n -= left

    def take(self, n: int) -> bytes | bytearray | memoryview:
        data = self.peek(0, n)
        self.drop(len(data))
        return data


class ResumableStream(trio.abc.Stream):
    """One logical stream over a series of transports (see the module docstring)."""

    def __init__(self, timing: Timing, buffer_limit: int = BUFFER_LIMIT) -> None:
        self.timing = timing
        self._limit = buffer_limit
        self._out = ByteQueue()  # sent by the Peer, not yet acknowledged
        self._out_base = 0  # stream offset of _out[0]
        self._send_pos = 0  # next offset to put on the current transport
        self._in = ByteQueue()  # received, not yet taken by the Peer
        self._received = 0  # stream offset received so far
        self._acked = 0  # how far we last told the peer
        self._wake_writer = trio.Event()
        self._changed = trio.Event()  # data in, room out, or the end
        self._closing = False
        self._settled = False  # aclose(settled): CLOSE without waiting for ACKs
        self._ended = False
        self.peer_closed = False
        self.connected = False
        self.bytes_on_transports = 0  # segment bytes sent and received, all transports

    # --- the Peer's side ---------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        while len(self._out) >= self._limit and not self._ended:
            await self._wait_change()
        if self._ended or self._closing:
            raise trio.BrokenResourceError("the session's stream has ended")
        self._out.append(data)
        self._wake_writer.set()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        while len(self._out) >= self._limit and not self._ended:
            await self._wait_change()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while not self._in and not self._ended and not self.peer_closed:
            await self._wait_change()
        n = len(self._in) if max_bytes is None else min(max_bytes, len(self._in))
        taken = self._in.take(n)
        data = bytes(taken) if isinstance(taken, memoryview) else taken
        if n:
            self._notify_change()  # room for the segment reader
        await trio.lowlevel.checkpoint()
        return data

    async def aclose(self, settled: bool = False) -> None:
        """The clean end: what is queued goes out, then CLOSE (bounded in time).
        ``settled``: CLOSE without waiting for the peer's acknowledgements."""
        if self._ended:
            return
        self._settled = settled
        if not self.connected and self.bytes_on_transports == 0:
            self.end()  # never carried (the first attach failed): nobody to tell
            return
        self._closing = True
        self._wake_writer.set()
        with trio.move_on_after(10):
            while not self._ended:
                await self._wait_change()
        self.end()

    def end(self) -> None:
        """The stream is over for good: the Peer reads EOF, sends fail."""
        self._ended = True
        self._notify_change()
        self._wake_writer.set()

    @property
    def ended(self) -> bool:
        return self._ended

    # --- one transport ------------------------------------------------------------------

    async def run_transport(self, transport: trio.abc.Stream, ahead: bool = False) -> None:
        """Carry the stream over ``transport`` until it is lost (returns) or the
        stream ends. The transport is closed on the way out.

        ``ahead``: the stream's first transport, whose data goes out before the peer's
        RESUME: a new stream's peer has nothing yet, so its RESUME can only say 0, and
        the first requests then travel with the attach line instead of a round trip
        later."""
        if ahead and (self.bytes_on_transports or self._out_base or self._received):
            raise ValueError("only a stream never carried may send ahead")
        resumed = trio.Event()
        if ahead:
            resumed.set()
        state: dict[str, Any] = {"heard": trio.current_time(), "sent": trio.current_time()}
        state["ahead"] = ahead
        self.connected = True
        try:
            async with trio.open_nursery() as nursery:

                async def guarded(fn: Any) -> None:
                    try:
                        await fn(transport, resumed, state)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        log.info("transport lost: %s", e)
                    except TransportLost as e:
                        log.info("%s", e)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(guarded, self._read_segments)
                nursery.start_soon(guarded, self._write_segments)
                nursery.start_soon(guarded, self._tick)
        finally:
            self.connected = False
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(transport)

    async def _send(
        self,
        transport: trio.abc.Stream,
        state: dict,
        kind: int,
        offset: int,
        data: bytes | bytearray | memoryview = b"",
    ) -> None:
        header = HEADER.pack(kind, offset, len(data))
        if len(data) < SEND_APART:
            await transport.send_all(header + data)
        else:  # two writes cost less than copying the data behind the header
            await transport.send_all(header)
            await transport.send_all(data)
        self.bytes_on_transports += len(header) + len(data)
        state["sent"] = trio.current_time()

    async def _write_segments(
        self, transport: trio.abc.Stream, resumed: trio.Event, state: dict
    ) -> None:
        await self._send(transport, state, RESUME, self._received)
        self._acked = self._received
        await resumed.wait()
        while True:
            end = self._out_base + len(self._out)
            if self._send_pos < end:
                start = self._send_pos - self._out_base
                chunk = self._out.peek(start, SEGMENT)
                offset = self._send_pos
                await self._send(transport, state, DATA, offset, chunk)
                # The peer may have acknowledged the chunk before send_all returned
                # (which moves _send_pos up to it): never count it twice.
                self._send_pos = max(self._send_pos, offset + len(chunk))
                continue
            if self._received > self._acked:
                self._acked = self._received
                await self._send(transport, state, ACK, self._acked)
                continue
            if state.pop("ping", False):
                await self._send(transport, state, PING, 0)
                continue
            if self._ended:
                return
            if self._closing and (not self._out or self._settled):
                await self._send(transport, state, CLOSE, end)
                self.end()
                return
            self._wake_writer = trio.Event()
            await self._wake_writer.wait()

    async def _read_exactly(self, transport: trio.abc.Stream, n: int, state: dict) -> bytes:
        parts = []
        got = 0
        while got < n:
            data = await transport.receive_some(n - got)
            if not data:
                raise TransportLost("the transport ended")
            parts.append(data)
            got += len(data)
            state["heard"] = trio.current_time()
            self.bytes_on_transports += len(data)
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)  # one copy (appending to a buffer made two)

    async def _read_segments(
        self, transport: trio.abc.Stream, resumed: trio.Event, state: dict
    ) -> None:
        while True:
            # What the Peer has not taken yet is bounded (the peer may be hostile); the
            # time we do not read is not the peer's silence.
            while len(self._in) >= self._limit and not self._ended:
                state["blocked"] = True
                await self._wait_change()
            if state.pop("blocked", False):
                state["heard"] = trio.current_time()  # the silence clock starts again
            kind, offset, length = HEADER.unpack(
                await self._read_exactly(transport, HEADER.size, state)
            )
            if length > SEGMENT or kind > RESUME:
                raise TransportLost(f"a malformed segment (kind {kind}, {length} bytes)")
            data = await self._read_exactly(transport, length, state) if length else b""
            if kind == RESUME:
                if offset > self._out_base + len(self._out):
                    raise TransportLost("the peer claims bytes never sent")
                self._acknowledged(offset)
                if offset < self._out_base:
                    raise TransportLost("the peer wants bytes no longer held")
                # Sent ahead on this transport: those bytes are on their way behind
                # the peer's RESUME, not lost. Otherwise send again from where it is.
                self._send_pos = max(offset, self._send_pos) if state["ahead"] else offset
                resumed.set()
                self._wake_writer.set()
            elif kind == ACK:
                self._acknowledged(offset)
            elif kind == DATA:
                if offset > self._received:
                    raise TransportLost("a gap in the stream")
                fresh = data[self._received - offset :]
                if fresh:
                    self._in.append(fresh)
                    self._received += len(fresh)
                    self._notify_change()
                    self._wake_writer.set()
            elif kind == CLOSE:
                self.peer_closed = True
                self._notify_change()
                return

    def _acknowledged(self, offset: int) -> None:
        done = min(offset, self._out_base + len(self._out)) - self._out_base
        if done > 0:
            self._out.drop(done)
            self._out_base += done
            self._send_pos = max(self._send_pos, self._out_base)
            self._notify_change()

    async def _tick(self, transport: trio.abc.Stream, resumed: trio.Event, state: dict) -> None:
        """A ping when we have said nothing for an interval; give up a silent transport."""
        while True:
            await trio.sleep(min(1.0, self.timing.interval / 2))
            now = trio.current_time()
            # While we do not read (the Peer has not taken what came), there is no
            # silence of the peer to judge.
            if not state.get("blocked") and now - state["heard"] >= self.timing.dead_after:
                raise TransportLost(f"nothing heard for {now - state['heard']:.0f} s")
            if now - state["sent"] >= self.timing.interval:
                state["ping"] = True
                self._wake_writer.set()

    # --- waiting ----------------------------------------------------------------------

    def _notify_change(self) -> None:
        """Wake every waiter (each waits on the event current when it began)."""
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()
