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
had next may have gone to a later file. The line is a heap (thousands of small files
may wait in it); a file whose place moves up is pushed again, and its old entry is
dropped when it surfaces.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Protocol


class Puller(Protocol):
    def turn(self) -> Any:
        """Its place in line (smallest first); it may only ever move up."""

    def start_next(self) -> int | None:
        """Start fetching its next chunk and return its size; None when none is left."""


class BulkWindow:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._line: list[tuple[Any, int, Puller]] = []
        self._seq = itertools.count()  # ties (and the pullers themselves) never compare

    def add(self, puller: Puller) -> None:
        heapq.heappush(self._line, (puller.turn(), next(self._seq), puller))
        self._fill()

    def moved_up(self, puller: Puller) -> None:
        """``puller``'s turn is earlier now (the job opened its file)."""
        self.add(puller)

    def release(self, size: int) -> None:
        """A chunk of ``size`` bytes arrived (or failed): room for the next."""
        self.in_flight -= size
        self._fill()

    def _fill(self) -> None:
        while self._line and self.in_flight < self.limit:
            turn, _, first = self._line[0]
            if turn != first.turn():  # it moved up since; its newer entry is in the line
                heapq.heappop(self._line)
                continue
            size = first.start_next()
            if size is None:
                heapq.heappop(self._line)
            else:
                self.in_flight += size
