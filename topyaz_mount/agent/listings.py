"""Directory listings of the client, kept briefly so a lookup need not ask it.

Every new output a job creates is first looked up by the kernel, and that negative
lookup was one round trip to the client; on a busy WAN link it waits behind the bulk
data queued ahead of it in ssh (seen: 180 ms per output at 20 ms of RTT). A directory
listed in the last ``ttl`` seconds answers lookups itself instead: a name it has is
answered with the attributes it came with, a name it lacks is ENOENT.

A listing only ever answers for names the agent itself has not changed: every name our
own operations touch (create, open for writing, mkdir, symlink, unlink, rename) is asked
about from then on, whatever a listing says. That set is kept apart from the listings
and outlives them: a listing read while an output's commit is still on its way lacks
the output, and must not deny it once the commit lands. What others change on the
client is seen as the kernel's own caches see it: after ``ttl`` (the kernel's entry
timeout), or at once in a watched session, where the client's invalidations drop the
listings they touch.
"""

from __future__ import annotations

import time

from ..wire import proto

MISSING = object()  # a name the listing lacks: the lookup's answer is ENOENT
UNKNOWN = object()  # no listing, or a name we changed ourselves: ask the client
STALE = object()  # a listing older than ``ttl``: read it again, or ask the client

# Listings bigger than this are not re-read to answer a lookup; a Stat is cheaper.
RELIST_MAX = 1000


class Listings:
    def __init__(self, ttl: float, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._dirs: dict[bytes, tuple[float, dict[bytes, proto.Attr]]] = {}
        self._ours: dict[bytes, set[bytes]] = {}  # names we changed, by directory

    def now(self) -> float:
        return self.clock()

    def listed(
        self, directory: bytes, entries: dict[bytes, proto.Attr], asked: float | None = None
    ) -> None:
        """The client's directory had exactly these names when we ``asked`` (default now)."""
        self._dirs[directory] = (self.clock() if asked is None else asked, dict(entries))

    def has(self, directory: bytes) -> bool:
        """Whether ``directory`` was ever listed (and not dropped since)."""
        return directory in self._dirs

    def answer(self, path: bytes) -> object:
        """The attributes of ``path``, or MISSING, UNKNOWN or STALE."""
        directory, _, name = path.rpartition(b"/")
        found = self._dirs.get(directory)
        if found is None:
            return UNKNOWN
        when, names = found
        if self.clock() - when > self.ttl:
            return STALE if len(names) <= RELIST_MAX else UNKNOWN
        if name in self._ours.get(directory, ()):
            return UNKNOWN
        return names.get(name, MISSING)

    def touched(self, path: bytes) -> None:
        """We change ``path`` on the client (or are about to): ask it from now on."""
        directory, _, name = path.rpartition(b"/")
        self._ours.setdefault(directory, set()).add(name)

    def drop(self, path: bytes) -> None:
        """Forget listings of ``path``, of what is below it, and of its directory."""
        prefix = path + b"/"
        parent = path.rpartition(b"/")[0]
        for d in [d for d in self._dirs if d in (path, parent) or d.startswith(prefix)]:
            del self._dirs[d]

    def moved(self, old: bytes, new: bytes) -> None:
        """A rename: listings of both ends go, and what we changed below ``old`` is now
        below ``new``."""
        self.drop(old)
        self.drop(new)
        self.touched(old)
        self.touched(new)
        prefix = old + b"/"
        for d in [d for d in self._ours if d == old or d.startswith(prefix)]:
            self._ours.setdefault(new + d[len(old) :], set()).update(self._ours.pop(d))
