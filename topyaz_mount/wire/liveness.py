"""Keepalives on the channel: each side notices a dead or silent peer, both ways alike.

Every ``interval`` seconds each side sends a ``Ping`` notice (a few bytes, urgent). A
side whose reader has waited ``dead_after`` seconds without a single byte from its peer
declares the peer gone; the client then ends ssh, the agent tears the session down.
Only time spent *waiting* for bytes counts: a reader that is itself held up (a job's
stdout pipe that the user does not read, say) is not silence of the peer.

Defaults: a ping every 10 s, dead after 45 s of silence (so a dead peer is noticed
45 s after its last byte). ssh's own check (``ServerAliveInterval``) is set a little
longer, so our clearer message comes first; options the user gives ssh win. For tests,
``TOPYAZ_MOUNT_KEEPALIVE=INTERVAL,DEAD_AFTER`` (seconds, e.g. ``1,5``) changes both
sides: the client passes it on to the agent.

Kept apart from the session code so a later reconnect (issue 14) can treat "peer
silent" as "reconnect" instead of "tear down".
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from .rpc import Peer

log = logging.getLogger(__name__)

ENV = "TOPYAZ_MOUNT_KEEPALIVE"
CAPABILITY = "keepalive"


@dataclass(frozen=True)
class Timing:
    interval: float = 10.0
    dead_after: float = 45.0

    @classmethod
    def parse(cls, text: str) -> Timing:
        """``INTERVAL,DEAD_AFTER`` in seconds (``1,5``); a ValueError says what is wrong."""
        try:
            interval, dead_after = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"{text!r}: expected INTERVAL,DEAD_AFTER in seconds") from None
        if not 0 < interval < dead_after:
            raise ValueError(f"{text!r}: need 0 < INTERVAL < DEAD_AFTER")
        return cls(interval, dead_after)

    def __str__(self) -> str:
        return f"{self.interval:g},{self.dead_after:g}"

    def ssh_options(self) -> list[str]:
        """ssh's own liveness check, a little longer than ours."""
        every = max(1, math.ceil(self.interval))
        count = math.ceil(self.dead_after / every) + 1
        return [f"ServerAliveInterval={every}", f"ServerAliveCountMax={count}"]


def from_env() -> Timing:
    """The timing set by ``TOPYAZ_MOUNT_KEEPALIVE``, or the defaults."""
    text = os.environ.get(ENV, "").strip()
    try:
        return Timing.parse(text) if text else Timing()
    except ValueError as e:
        raise UsageError(f"{ENV}: {e}") from None


async def watch(peer: Peer, timing: Timing, on_silent: Callable[[float], Awaitable[None]]) -> None:
    """Ping ``peer`` every ``timing.interval``; once it has been silent for
    ``timing.dead_after`` seconds, await ``on_silent(seconds)`` and return."""
    import trio

    from . import proto  # here, not above: the command line reads Timing before ssh starts
    from .rpc import ConnectionLost

    next_ping = trio.current_time()
    while not peer.closed:
        now = trio.current_time()
        if now >= next_ping:
            next_ping = now + timing.interval
            # A queue full of our own frames (backpressure) must not stop the watch.
            with trio.move_on_after(timing.interval):
                try:
                    await peer.notify(proto.Ping(), proto.PRIO_URGENT)
                except ConnectionLost:
                    return
            now = trio.current_time()
        idle = peer.idle_since
        if idle is not None and now - idle >= timing.dead_after:
            log.warning("nothing from the peer for %.0f s: taking it for dead", now - idle)
            await on_silent(now - idle)
            return
        wake = next_ping if idle is None else min(next_ping, idle + timing.dead_after)
        await trio.sleep_until(wake)
