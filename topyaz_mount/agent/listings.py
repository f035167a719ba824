"""Directory listings of the client, kept briefly so a lookup need not ask it.

Every new output a job creates is first looked up by the kernel, and that negative
lookup was one round trip to the client; on a busy WAN link it waits behind the bulk
data queued ahead of it in ssh (seen: 180 ms per output at 20 ms of RTT). A directory
listed in the last ``ttl`` seconds answers lookups itself instead: a name it has is
answered with the attributes it came with, a name it lacks is ENOENT.

The listing is the client's directory as it was, plus every name our own operations
may have put there since (creates, mkdir, symlink, rename targets), so a lookup never
misses a file the job made. Names we removed stay listed: that only costs a round
trip. What others change on the client is seen as the kernel's own caches see it:
after ``ttl`` (the kernel's entry timeout), or at once in a watched session, where the
client's invalidations drop the listings they touch.
"""

from __future__ import annotations

import time

from .. import proto

MISSING = object()  # a name the listing lacks: the lookup's answer is ENOENT
UNKNOWN = object()  # no listing, or a name we changed ourselves: ask the client
STALE = object()  # a listing older than ``ttl``: read it again, or ask the client

# Listings bigger than this are not re-read to answer a lookup; a Stat is cheaper.
RELIST_MAX = 1000


class Listings:
    def __init__(self, ttl: float, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._dirs: dict[bytes, tuple[float, dict[bytes, proto.Attr | None]]] = {}

    def listed(self, directory: bytes, entries: dict[bytes, proto.Attr | None]) -> None:
        """The client's directory has exactly these names now."""
        self._dirs[directory] = (self.clock(), dict(entries))

    def answer(self, path: bytes) -> object:
        """The attributes of ``path``, or MISSING, UNKNOWN or STALE."""
        directory, _, name = path.rpartition(b"/")
        found = self._dirs.get(directory)
        if found is None:
            return UNKNOWN
        when, names = found
        if self.clock() - when > self.ttl:
            return STALE if len(names) <= RELIST_MAX else UNKNOWN
        attr = names.get(name, MISSING)
        return UNKNOWN if attr is None else attr

    def touched(self, path: bytes) -> None:
        """We changed ``path`` on the client (or are about to): ask it next time."""
        directory, _, name = path.rpartition(b"/")
        found = self._dirs.get(directory)
        if found is not None:
            found[1][name] = None

    def drop(self, path: bytes) -> None:
        """Forget listings of ``path``, of what is below it, and of its directory."""
        prefix = path + b"/"
        parent = path.rpartition(b"/")[0]
        for d in [d for d in self._dirs if d in (path, parent) or d.startswith(prefix)]:
            del self._dirs[d]
