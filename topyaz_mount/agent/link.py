"""The agent's calls to the client, with deadlines, as plain OSErrors.

A FUSE handler must never wait on the network forever (a reader in the kernel may be
uninterruptible), so every call has a deadline, and a lost connection is an EIO.
While a detachable session waits for its client to come back (``host.py``), the link
is *held*: no deadline runs, so a FUSE request waits for the client instead of failing
the job with EIO; on re-attach each call gets its full deadline again.
"""

from __future__ import annotations

import errno
import math
from typing import Any

import trio

from ..wire import proto
from ..wire.rpc import ConnectionLost, Peer

DEFAULT_DEADLINE = 120.0


class ClientLink:
    def __init__(self, peer: Peer, deadline: float = DEFAULT_DEADLINE) -> None:
        self.peer = peer
        self.deadline = deadline
        self.held = False
        self._deadlines: set[trio.CancelScope] = set()

    def hold(self) -> None:
        """The client is away but may come back: no call times out meanwhile."""
        self.held = True
        for scope in self._deadlines:
            scope.deadline = math.inf

    def release(self) -> None:
        """The client is back: every call waiting gets its full deadline from now."""
        self.held = False
        deadline = trio.current_time() + self.deadline
        for scope in self._deadlines:
            scope.deadline = deadline

    async def call(
        self, req: Any, prio: int = proto.PRIO_NORMAL, *, after_bulk: bool = False
    ) -> Any:
        try:
            with trio.CancelScope() as scope:
                scope.deadline = math.inf if self.held else trio.current_time() + self.deadline
                self._deadlines.add(scope)
                try:
                    return await self.peer.call(req, prio, after_bulk=after_bulk)
                finally:
                    self._deadlines.discard(scope)
        except ConnectionLost as e:
            raise OSError(errno.EIO, f"connection to the client lost: {e}") from None
        raise OSError(errno.EIO, f"the client did not answer {type(req).__name__}")

    async def notify(self, msg: Any, prio: int = proto.PRIO_NORMAL) -> None:
        try:
            await self.peer.notify(msg, prio)
        except ConnectionLost as e:
            raise OSError(errno.EIO, f"connection to the client lost: {e}") from None

    # The read cache's view of the client (see readcache.ChunkSource).
    async def open_read(self, path: bytes) -> tuple[int, proto.Attr, bytes | None]:
        res = await self.call(proto.OpenRead(path), proto.PRIO_URGENT)
        return res.handle, res.attr, res.blake3

    async def read_chunk(self, handle: int, offset: int, length: int, prio: int) -> bytes:
        res = await self.call(proto.ReadChunk(handle, offset, length), prio)
        return res.data

    async def close_read(self, handle: int) -> None:
        await self.call(proto.CloseRead(handle))
