"""The client's end of a detachable session: one stream over a series of ssh connections.

The session's ``Peer`` runs on a ``resume.ResumableStream``. When the ssh under it is
lost (it ends, or says nothing for the keepalive's ``dead_after``), this kills it and
starts a fresh ssh with the same options whose agent re-attaches to the session host
(``--attach SESSION``), with backoff and jitter, until the remote's grace runs out.
The stream then resumes where it stopped, so every request in flight, every output
byte and the exit status arrive exactly once. One line per outage goes to the user.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..errors import AgentUnavailable
from ..wire import resume
from .transport import SshProcess, start_ssh

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
PREAMBLE_LIMIT = 64 << 10  # what a login shell may print before the attach answer


class AttachRefused(AgentUnavailable):
    """The remote has no such session (any more), or refused our secret."""


class SessionUnreachable(Exception):
    """This ssh ended before the remote answered the attach."""


def backoff(attempt: int, away: float) -> float:
    """Seconds before the next try: short at first (a Wi-Fi change is over in
    seconds), longer once an outage has lasted a minute; jittered so many clients do
    not come back in step."""
    cap = 1.0 if away < 60 else 10.0
    return min(cap, 0.25 * 2**attempt) * random.uniform(0.5, 1.0)


class Reconnector:
    def __init__(self, session: Session, on_line: Callable[[str], None]) -> None:
        self.session = session
        self.stream = resume.ResumableStream(session.settings.keepalive)
        self.on_line = on_line
        self.outages = 0
        self.fresh = False  # the first attach takes the session over (attach.py)
        self.failure: Exception | None = None  # why the first attach got no answer

    def attach_line(self) -> bytes:
        sid, secret = self.session.session_id, self.session.secret
        return resume.Attach(resume.VERSION, sid, secret, self.fresh).line()

    async def start(self, timeout: float) -> resume.ResumableStream:
        """Attach over the session's first ssh; start carrying the stream.

        A session this process starts sends its first requests right behind the attach
        line (``run_transport``'s ``ahead``), and the agent's answer is read by the
        transport's first receive (``_Answering``): the round trip to that answer is
        no longer in front of every request. Taking a session over waits for it."""
        if self.fresh:
            with trio.fail_after(timeout):
                await self._attach(self.session.ssh)
            self.fresh = False  # a later reconnect resumes this process's stream
            self.session.nursery.start_soon(self._carry, None)
            return self.stream
        try:
            await self.session.ssh.stream.send_all(self.attach_line())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise SessionUnreachable("the connection ended before the attach") from None
        first = _Answering(self, self.session.ssh, timeout)
        self.session.nursery.start_soon(self._carry, first)
        return self.stream

    async def _attach(self, ssh: SshProcess) -> None:
        try:
            await ssh.stream.send_all(self.attach_line())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise SessionUnreachable("the connection ended before the attach") from None
        await self._answer(ssh)

    async def _answer(self, ssh: SshProcess) -> None:
        """Read past what a login shell prints, up to the agent's answer to the attach."""
        seen = 0
        while True:
            try:
                line = await resume.read_line(ssh.stream, PREAMBLE_LIMIT)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                line = b""
            except ValueError:  # one endless line: not our agent
                raise SessionUnreachable("no attach answer from the agent") from None
            if not line:
                raise SessionUnreachable("the connection ended before the agent answered")
            if line == resume.OK_LINE:
                return
            if line.startswith(resume.REFUSED_PREFIX):
                reason = line[len(resume.REFUSED_PREFIX) :].decode(errors="replace").strip()
                raise AttachRefused(f"{self.session.settings.remote}: {reason}")
            seen += len(line)
            if seen > PREAMBLE_LIMIT:
                raise SessionUnreachable("no attach answer from the agent")
            log.info("remote login printed: %r", line[:200])

    async def _carry(self, first: _Answering | None) -> None:
        """The stream over the first ssh, then over each reconnect's. A first attach
        the agent never answered ends the stream: there is no session to resume."""
        if first is not None:
            await self.stream.run_transport(first, ahead=True)
            if first.failure is not None:
                self.failure = first.failure
                self.stream.end()
                return
        else:
            await self.stream.run_transport(self.session.ssh.stream)
        while not (self.stream.ended or self.stream.peer_closed):
            await self._reconnect()
            if self.stream.ended:
                return
            await self.stream.run_transport(self.session.ssh.stream)

    async def _reconnect(self) -> None:
        """A fresh ssh attached to the session, or the stream ended past the grace."""
        lost_at = time.time()
        started = trio.current_time()
        self.outages += 1
        old = self.session.ssh
        old.kill()
        await old.wait()
        give_up = self.session.settings.grace + self.session.settings.keepalive.dead_after
        settings = dataclasses.replace(
            self.session.settings,
            agent_args=(*self.session.settings.agent_args, "--attach", self.session.session_id),
        )
        attempt = 0
        while trio.current_time() - started < give_up:
            await trio.sleep(backoff(attempt, trio.current_time() - started))
            attempt += 1
            log.info("reconnecting to %s (attempt %d)", settings.remote, attempt)
            ssh = await start_ssh(settings)
            self.session.nursery.start_soon(ssh.pump_stderr)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await self._attach(ssh)
            except AttachRefused as e:
                ssh.kill()
                await ssh.wait()
                self.on_line(f"link lost at {_clock(lost_at)}; the session is gone ({e})")
                self.stream.end()
                return
            except (SessionUnreachable, trio.TooSlowError, OSError) as e:
                log.info("reconnect attempt %d failed: %s", attempt, e)
                ssh.kill()
                await ssh.wait()
                continue
            self.session.ssh = ssh
            away = trio.current_time() - started
            self.on_line(f"link lost at {_clock(lost_at)}, reconnected after {away:.0f} s")
            return
        self.on_line(
            f"link lost at {_clock(lost_at)}; no reconnect within {give_up:.0f} s: giving up"
        )
        self.stream.end()

    async def close(self, settled: bool = False) -> None:
        """The clean end of the stream (the host then ends too). ``settled``: the
        session is over on both sides: CLOSE goes out without waiting for the peer
        to acknowledge what it was sent (it had stopped; that wait ran out at 10 s)."""
        await self.stream.aclose(settled)


class _Answering(trio.abc.Stream):
    """The first ssh's stream, whose first receive reads the agent's answer to the
    attach line while the stream's segments already go out behind it."""

    def __init__(self, reconnector: Reconnector, ssh: SshProcess, timeout: float) -> None:
        self.reconnector = reconnector
        self.ssh = ssh
        self.timeout = timeout
        self.answered = False
        self.failure: Exception | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self.answered:
            try:
                with trio.fail_after(self.timeout):
                    await self.reconnector._answer(self.ssh)
            except (SessionUnreachable, AttachRefused, trio.TooSlowError) as e:
                self.failure = e
                raise trio.BrokenResourceError(str(e) or "no attach answer in time") from None
            self.answered = True
        return await self.ssh.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.ssh.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssh.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.ssh.stream.aclose()


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))
