"""The agent's calls to the client, with deadlines, as plain OSErrors.

A FUSE handler must never wait on the network forever (a reader in the kernel may be
uninterruptible), so every call has a deadline, and a lost connection is an EIO.
While a detachable session waits for its client to come back (``host.py``), the link
is *held*: no deadline runs, so a FUSE request waits for the client instead of failing
the job with EIO; on re-attach each call gets its full deadline again.

A new client process may take the session over (``topyaz-mount attach``): the link
then *switches* to a new Peer. A call cut by the switch is sent again to the new
client, except a commit's (``Superseded``: the spool sends the whole output again).
Read handles are the link's own numbers, each mapped to the client's handle and path:
a handle of the old client is opened again on the new one (ESTALE if the file changed).
"""

from __future__ import annotations

import errno
import itertools
import math
from dataclasses import dataclass
from typing import Any

import trio

from ..wire import proto
from ..wire.rpc import ConnectionLost, Peer

DEFAULT_DEADLINE = 120.0
# Requests whose state lives in the client that made it: not sent again to a new one.
_NOT_RESENT = (proto.CommitBegin, proto.CommitEnd, proto.CommitAbort)


class Superseded(OSError):
    """A commit's request was cut off by a new client taking the session over."""


@dataclass
class _Handle:
    epoch: int  # the client (counted by switches) the handle is of
    handle: int  # that client's handle
    path: bytes
    attr: proto.Attr


class ClientLink:
    def __init__(self, peer: Peer, deadline: float = DEFAULT_DEADLINE) -> None:
        self.peer = peer
        self.deadline = deadline
        self.held = False
        self._deadlines: set[trio.CancelScope] = set()
        self.epoch = 0  # switches so far
        self.switching = False
        self._switched = trio.Event()
        self._handles: dict[int, _Handle] = {}
        self._handle_ids = itertools.count(1)

    def begin_switch(self) -> None:
        """A new client is taking over: calls cut off from now on wait for it."""
        self.switching = True

    def switch(self, peer: Peer) -> None:
        """The new client's Peer runs: calls go to it."""
        self.peer = peer
        self.epoch += 1
        self.switching = False
        self._switched.set()
        self._switched = trio.Event()
        self.release()

    async def superseded_since(self, epoch: int) -> bool:
        """Whether a new client took over since ``epoch`` (waits for one taking over)."""
        if self.switching:
            await self._switched.wait()
        return self.epoch != epoch

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
        while True:
            epoch = self.epoch
            try:
                return await self._call_once(req, prio, after_bulk)
            except OSError:
                if not await self.superseded_since(epoch):
                    raise
                if isinstance(req, _NOT_RESENT):
                    raise Superseded(errno.EIO, "a new client took the session over") from None

    async def _call_once(self, req: Any, prio: int, after_bulk: bool) -> Any:
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
        ours = next(self._handle_ids)
        self._handles[ours] = _Handle(self.epoch, res.handle, path, res.attr)
        return ours, res.attr, res.blake3

    async def read_chunk(self, handle: int, offset: int, length: int, prio: int) -> bytes:
        h = self._handles.get(handle)
        if h is None:
            raise OSError(errno.EBADF, "unknown read handle")
        while True:
            if h.epoch != self.epoch:
                await self._reopen(h)
            epoch = self.epoch
            try:
                res = await self._call_once(proto.ReadChunk(h.handle, offset, length), prio, False)
                return res.data
            except OSError:
                if not await self.superseded_since(epoch):
                    raise

    async def _reopen(self, h: _Handle) -> None:
        """A handle of a client gone: the same file, opened on the new one."""
        res = await self.call(proto.OpenRead(h.path), proto.PRIO_URGENT)
        h.epoch, h.handle = self.epoch, res.handle
        if (res.attr.size, res.attr.mtime_ns) != (h.attr.size, h.attr.mtime_ns):
            raise OSError(errno.ESTALE, "the file changed on the client while being read")

    def handle_of(self, client_handle: int) -> int | None:
        """Our handle for the current client's ``client_handle`` (its Hashed notices)."""
        for ours, h in self._handles.items():
            if h.epoch == self.epoch and h.handle == client_handle:
                return ours
        return None

    async def close_read(self, handle: int) -> None:
        h = self._handles.pop(handle, None)
        if h is not None and h.epoch == self.epoch:
            await self.call(proto.CloseRead(h.handle))
