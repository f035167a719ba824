"""A bandwidth limit (``--bwlimit``, written as ``config.parse_bwlimit`` reads it):
a token bucket.

The bucket is pure arithmetic over a clock the caller passes in, so its accounting is
tested over simulated time; ``rpc.Peer``'s writer asks it how long to wait before each
piece it sends. Sending takes the bytes at once and the bucket goes into debt; the
next piece waits until the debt is paid. So over any stretch of T seconds at most
``burst + rate * T`` bytes go out, and a sender that stays busy averages ``rate``.

The writer sends at most ``quantum`` bytes per piece and takes frames in priority order
between pieces, so a frame the job waits for (a read's reply, a lookup) waits behind
at most one bulk frame that has begun, never behind the whole bulk queue: urgent
requests go first within the limit, they do not go beyond it.
"""

from __future__ import annotations

MIN_QUANTUM = 16 << 10
MAX_QUANTUM = 256 << 10


class TokenBucket:
    """``rate`` bytes a second, with up to ``burst`` bytes sent at once after a pause."""

    def __init__(self, rate: int, burst: int | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("a rate must be positive")
        self.rate = rate
        # A tenth of a second's worth: smooth enough for the link, big enough that the
        # per-piece work stays small.
        self.burst = burst if burst is not None else max(MIN_QUANTUM, rate // 10)
        self.quantum = min(max(self.burst, MIN_QUANTUM), MAX_QUANTUM)
        self._tokens = float(self.burst)
        self._at = now

    def delay(self, size: int, now: float) -> float:
        """Take ``size`` bytes at ``now``; the seconds to wait before sending them."""
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now
        self._tokens -= size
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def bucket(rate: int) -> TokenBucket | None:
    """The bucket for a limit of ``rate`` bytes a second (None for 0: no limit)."""
    return TokenBucket(rate) if rate > 0 else None
