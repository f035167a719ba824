"""What a new client process gets when it takes a detached session over (``attach``).

The old client's stream died with it, so the bytes it had not written out cannot come
from the stream (resume.py): each job's stdout and stderr are also kept here, the
last ``LIMIT`` bytes of each, numbered from the job's first byte, and each job's
``Exited`` once it is sent. The new client says how far it got; the rest is sent again.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..wire import proto

LIMIT = 1 << 20  # bytes kept of each job's stdout and of its stderr
MAX_ENDED = 8  # ended jobs whose output and status are kept (a long-lived session)


class OutputLog:
    """The tail of one job's stdout and stderr, by stream offset."""

    def __init__(self) -> None:
        self._data = {1: bytearray(), 2: bytearray()}
        self._total = {1: 0, 2: 0}

    def add(self, fd: int, data: bytes) -> None:
        buf = self._data.setdefault(fd, bytearray())
        buf += data
        self._total[fd] = self._total.get(fd, 0) + len(data)
        if len(buf) > LIMIT:
            del buf[: len(buf) - LIMIT]

    def since(self, fd: int, offset: int) -> tuple[bytes, int]:
        """The bytes from ``offset`` on, and how many before them are no longer kept."""
        buf = self._data.get(fd, bytearray())
        total = self._total.get(fd, 0)
        base = total - len(buf)
        start = max(offset, base)
        return bytes(buf[start - base :]), start - max(offset, 0)


class Replay:
    """Every job's output log, and the ``Exited`` of those that ended."""

    def __init__(self) -> None:
        self.logs: dict[int, OutputLog] = {}
        self.exits: dict[int, proto.Exited] = {}

    def output(self, job: int, fd: int, data: bytes) -> None:
        self.logs.setdefault(job, OutputLog()).add(fd, data)

    def exited(self, msg: proto.Exited) -> None:
        self.exits[msg.job] = msg
        while len(self.exits) > MAX_ENDED:
            oldest = next(iter(self.exits))
            del self.exits[oldest]
            self.logs.pop(oldest, None)

    def messages(self, offsets: list[list[int]]) -> Iterator[object]:
        """What the new client lacks, given how far it got ([job, fd, bytes] each)."""
        got = {(o[0], o[1]): o[2] for o in offsets if len(o) == 3}
        for job, log in self.logs.items():
            for fd in (1, 2):
                data, skipped = log.since(fd, got.get((job, fd), 0))
                if skipped:
                    name = "stdout" if fd == 1 else "stderr"
                    text = f"{skipped} bytes of the job's {name} were past the remote's buffer"
                    yield proto.Log("warning", text, job)
                for i in range(0, len(data), proto.CHUNK_SIZE):
                    yield proto.Output(job, fd, data[i : i + proto.CHUNK_SIZE])
        yield from self.exits.values()
