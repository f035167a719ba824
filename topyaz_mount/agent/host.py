"""The session host: the one process that owns a detachable session (issue 14).

It runs an ordinary ``AgentSession`` over a ``resume.ResumableStream``, so the session
never sees a connection come and go. Connections arrive through ssh-side relays
(``relay.py``): the first as a socket pair from the relay that started this host,
later ones on ``host.sock`` in the 0700 session directory. Each starts with the attach
line; a later one must carry the session's id and the secret the first one set
(compared in constant time), or it is refused.

When the connection is lost the host keeps everything for ``grace`` seconds: calls to
the client are held (``ClientLink.hold``: no deadline, so no FUSE request fails with
EIO), outputs keep going into the spool, reads the cache can answer are answered. A
client that comes back resumes where the stream stopped; past the grace the stream
ends, and the session tears down as it does on a lost connection today (the job's
group ended, outputs kept as ``kept/`` defines).

A *new* client process (``topyaz-mount attach``, after the client died) cannot resume
the stream: it has neither the bytes its predecessor received nor its requests in
flight. Its attach line says so (``fresh``): the session then goes on over a new
stream with a new Peer (``AgentSession.switch``), and the new client asks for what it
lacks (``Reattach``, replay.py). Only a detached session is taken over this way.
"""

from __future__ import annotations

import array
import json
import logging
import os
import shlex
import socket
import sys
import time
from typing import TYPE_CHECKING

import trio

from ..wire import resume
from ..wire.liveness import Timing
from . import hostos
from .relay import HOST_SOCKET, HOST_STATE

if TYPE_CHECKING:
    from .link import ClientLink
    from .session import AgentSession

log = logging.getLogger(__name__)

ATTACH_TIMEOUT = 10.0


class SessionHost:
    def __init__(self, session: AgentSession, timing: Timing, grace: float) -> None:
        self.session = session
        session.detachable = True
        self.grace = grace
        self.timing = timing
        self.stream = resume.ResumableStream(timing)
        self.attach: resume.Attach | None = None
        self._carrying: trio.CancelScope | None = None
        self._carried = trio.Event()  # set when the connection we carried is let go
        self._carried.set()
        self._switch = trio.Lock()  # one connection takes over at a time
        self.lost_at: float | None = None
        self.started = time.time()

    async def serve(self, first: socket.socket) -> None:
        try:
            conn = await channel_of(trio.socket.from_stdlib_socket(first))
        except OSError as e:
            log.error("no channel from the relay: %s", e)
            return
        with trio.move_on_after(ATTACH_TIMEOUT):
            try:
                self.attach = resume.Attach.parse(await resume.read_line(conn))
            except (ValueError, trio.BrokenResourceError, OSError) as e:
                log.error("no attach line from the client: %s", e)
        if self.attach is None or self.attach.version != resume.VERSION:
            await _refuse(conn, f"expected attach version {resume.VERSION}")
            return
        if self.attach.fresh:  # a session to take over, and it is not here
            await _refuse(conn, "no such session on this host")
            return
        if not await self._take_over(conn):
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._carry, conn)
            nursery.start_soon(self._listen)
            nursery.start_soon(self._watch_grace)
            await self.session.serve(self.stream)
            nursery.cancel_scope.cancel()

    async def _take_over(self, conn: trio.abc.Stream) -> bool:
        """Let go of the connection we carry (a newer one wins over one we think
        alive), then answer OK on ``conn``; False if it is gone meanwhile."""
        async with self._switch:
            if self._carrying is not None:
                self._carrying.cancel()
            await self._carried.wait()
            self._carrying = trio.CancelScope()
            self._carried = trio.Event()
            try:
                await conn.send_all(resume.OK_LINE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._carried.set()
                return False
        return True

    async def _carry(self, conn: trio.abc.Stream) -> None:
        """The stream over ``conn`` (taken over) until it is lost or let go; a loss
        holds calls to the client for the grace."""
        scope, carried = self._carrying, self._carried
        assert scope is not None
        self.lost_at = None
        link = self._link()
        if link is not None:
            link.release()
        try:
            with scope:
                await self.stream.run_transport(conn)
        finally:
            carried.set()
        if scope.cancelled_caught:
            return  # let go for a newer connection: not an outage
        if not self.stream.ended and not self.stream.peer_closed:
            self.lost_at = trio.current_time()
            link = self._link()
            if link is not None:
                link.hold()
            log.warning("connection lost: keeping the session for %g s", self.grace)
            self._record()

    def _link(self) -> ClientLink | None:
        return getattr(self.session, "link", None)  # set once the session serves

    async def _listen(self) -> None:
        """Accept re-attaches on ``host.sock`` once the session directory exists."""
        if sys.platform == "win32":
            return  # no AF_UNIX in Python on Windows: re-attach is not built there
        while self.session.dir is None:
            await trio.sleep(0.05)
        listener = trio.socket.socket(socket.AF_UNIX)
        path = self.session.dir / HOST_SOCKET
        with listener:
            try:
                await listener.bind(str(path))
                os.chmod(path, 0o600)
                listener.listen(4)
            except OSError as e:  # a session over already removes its directory
                if not self.session.torn_down:
                    log.warning("this session cannot be re-attached: %s", e)
                return
            self._record()
            async with trio.open_nursery() as nursery:
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._attach_relay, sock)

    async def _attach_relay(self, sock: trio.socket.SocketType) -> None:
        try:
            conn = await channel_of(sock)
        except OSError as e:
            log.warning("no channel from a relay: %s", e)
            return
        await self._attach(conn)

    async def _attach(self, conn: trio.abc.Stream) -> None:
        assert self.attach is not None
        attach = None
        with trio.move_on_after(ATTACH_TIMEOUT):
            try:
                attach = resume.Attach.parse(await resume.read_line(conn))
            except (ValueError, trio.BrokenResourceError, OSError):
                pass
        if (
            attach is None
            or attach.version != resume.VERSION
            or attach.session_id != self.attach.session_id
            or not attach.same_secret(self.attach.secret)
        ):
            log.warning("refused an attach without this session's id and secret")
            await _refuse(conn, "not this session's id and secret")
            return
        if self.stream.ended or self.session.torn_down:
            await _refuse(conn, "the session has ended")
            return
        if attach.fresh and self.stream.connected:
            await _refuse(conn, "the session is attached to a live client")
            return
        away = 0.0 if self.lost_at is None else trio.current_time() - self.lost_at
        if not await self._take_over(conn):
            return
        if attach.fresh:
            old, self.stream = self.stream, resume.ResumableStream(self.timing)
            self.session.switch(self.stream)
            old.end()
        log.warning("client re-attached after %.1f s", away)
        self.lost_at = None
        self._record()
        await self._carry(conn)

    def _record(self) -> None:
        """``host.json`` in the session dir, for ``status --remote`` (relay.list_hosts)."""
        if self.session.dir is None or self.session.torn_down:
            return
        detached = self.lost_at is not None
        state = {
            "session": self.session.dir.name,
            "pid": os.getpid(),
            "root": self.session.client_root,
            "grace_seconds": self.grace,
            "detached_since": time.time() if detached else None,
            "jobs": len(self.session.jobs),
            "command": [shlex.join(job.argv) for job in self.session.jobs.values()],
            "since": self.started,
        }
        tmp = self.session.dir / f".{HOST_STATE}.tmp"
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.session.dir / HOST_STATE)
        except OSError as e:
            log.warning("could not record the session's state: %s", e)

    async def _watch_grace(self) -> None:
        """Past the grace (or once the session is torn down), end the stream for good."""
        while not self.stream.ended:
            await trio.sleep(0.5)
            if self.session.torn_down and not self.stream.connected:
                self.stream.end()
            elif self.lost_at is not None and trio.current_time() - self.lost_at >= self.grace:
                log.warning("the client did not come back within %g s: ending", self.grace)
                self.stream.end()


async def _refuse(conn: trio.abc.Stream, reason: str) -> None:
    try:
        await conn.send_all(resume.REFUSED_PREFIX + reason.encode() + b"\n")
    except (trio.BrokenResourceError, OSError):
        pass
    await trio.aclose_forcefully(conn)


class _Channel(trio.abc.HalfCloseableStream):
    """The ssh channel a relay handed over (its stdin and stdout), with the relay's
    socket: closing it closes both, which lets the relay (and ssh's session) end."""

    def __init__(self, pipes: trio.abc.HalfCloseableStream, sock: trio.socket.SocketType):
        self.pipes = pipes
        self.sock = sock

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.pipes.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.pipes.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.pipes.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.pipes.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.sock.close()
        await self.pipes.aclose()


async def channel_of(sock: trio.socket.SocketType) -> trio.abc.HalfCloseableStream:
    """The ssh channel's fds the relay sends over ``sock`` (``SCM_RIGHTS``), as a
    stream; the fds are made close-on-exec (a job must not hold the channel)."""
    if sys.platform == "win32":  # no AF_UNIX there: no detachable session (host.py)
        raise OSError("a detachable session needs unix sockets")
    fds = array.array("i")
    with trio.move_on_after(ATTACH_TIMEOUT):
        _, ancdata, _, _ = await sock.recvmsg(1, socket.CMSG_SPACE(2 * fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    for fd in fds:
        os.set_inheritable(fd, False)  # (MSG_CMSG_CLOEXEC is Linux's alone)
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise OSError(f"expected the channel's 2 fds, got {len(fds)}")
    return _Channel(hostos.channel(fds[0], fds[1]), sock)
