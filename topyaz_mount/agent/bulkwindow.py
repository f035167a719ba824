"""How many prefetch bytes are on their way at once, and whose go first.

Files being pulled register here, and whenever there is room the window starts the next
chunk of the file that comes first: a file the job has opened before any it has not,
then in prefetch (manifest) order. So a batch arrives in the order the job reads it,
each file at the link's full rate, instead of eight files at once at an eighth of it;
and a file the job opens out of turn overtakes the prefetch.

Room is counted in bytes requested and not yet arrived. Too little leaves the link idle
between replies; more than the link holds only queues below us (ssh's channel window,
TCP buffers), where every reply the job is waiting for queues behind it.

The window picks and starts chunks itself, synchronously, rather than waking waiters:
a woken waiter rejoins the line only once it runs, and by then the room it would have
had next may have gone to a later file.
"""

from __future__ import annotations

from typing import Any, Protocol


class Puller(Protocol):
    def turn(self) -> Any:
        """Its place in line (smallest first); read each time room frees up."""

    def start_next(self) -> int | None:
        """Start fetching its next chunk and return its size; None when none is left."""


class BulkWindow:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._pullers: list[Puller] = []

    def add(self, puller: Puller) -> None:
        self._pullers.append(puller)
        self._fill()

    def release(self, size: int) -> None:
        """A chunk of ``size`` bytes arrived (or failed): room for the next."""
        self.in_flight -= size
        self._fill()

    def _fill(self) -> None:
        while self._pullers and self.in_flight < self.limit:
            first = min(self._pullers, key=lambda p: p.turn())
            size = first.start_next()
            if size is None:
                self._pullers.remove(first)
            else:
                self.in_flight += size
