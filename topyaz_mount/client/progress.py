"""What a session is moving, as it moves: figures, a terminal line, JSON lines.

The figures come from the counters the client keeps anyway (``FileServer.stats``,
which ``--stats`` also reports), so the live view and the summary cannot disagree.
A ``Tracker`` turns them into a ``Progress`` snapshot relative to where the job
began; ``watch`` hands one to a callback every interval and a last one at the end.

Two ways to show it: ``TerminalLine`` keeps one line at the bottom of the terminal
(drawn with rich) and clears it before any byte of the job's own output is written,
redrawing only once that output ends a line, so the job's lines are never torn;
``JsonLines`` prints one JSON object per line, for GUIs and scripts. Our own lines
(``-v`` logging through ``LogHandler``, notes) go out ``aside`` the line: cleared
before, redrawn after. trio is imported where it is used: the command line installs
``LogHandler`` before it starts ssh, and imports trio only after.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Any

from .config import human_size

if TYPE_CHECKING:
    from .fileserver import FileServer

RATE_WINDOW = 5.0  # seconds the rate is averaged over


@dataclass(frozen=True)
class Progress:
    """One look at a job's transfer. ``in_expected``: input bytes the job's manifest
    says must cross the link (those the remote cache lacks); ``in_skipped``: manifest
    bytes the cache already had. ``out_pending``: output bytes received and not yet
    committed. ``rate``: input bytes per second lately; ``eta``: seconds until the
    expected inputs have arrived at that rate (None when unknown)."""

    phase: str
    in_bytes: int
    in_expected: int
    in_skipped: int
    in_files: int
    out_bytes: int
    out_pending: int
    out_files: int
    elapsed: float
    rate: float
    eta: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Callback = Callable[[Progress], None]
Sink = Callable[[bytes], None]


def from_flat(info: dict[str, Any], prefix: str = "progress_") -> Progress | None:
    """The snapshot a session's status carries as ``progress_*`` keys, if it does."""
    fields = {k[len(prefix) :]: v for k, v in info.items() if k.startswith(prefix)}
    return Progress(**fields) if fields else None


class Tracker:
    """Snapshots of ``server``'s counters since the tracker was made."""

    def __init__(self, server: FileServer) -> None:
        import trio

        self.server = server
        self.phase = "connecting"
        s = server.stats
        self._base = (
            s.bytes_read,
            s.files_opened,
            s.bytes_committed,
            s.files_committed,
            s.manifest_bytes,
            s.manifest_cached_bytes,
        )
        self._started = trio.current_time()
        self._samples: deque[tuple[float, int]] = deque()

    def snapshot(self) -> Progress:
        import trio

        s = self.server.stats
        now = trio.current_time()
        got = s.bytes_read - self._base[0]
        self._samples.append((now, got))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        rate = (got - b0) / (now - t0) if now > t0 else 0.0
        manifest = s.manifest_bytes - self._base[4]
        cached = s.manifest_cached_bytes - self._base[5]
        expected = manifest - cached
        eta = (expected - got) / rate if rate > 0 and expected > got else None
        return Progress(
            phase=self.phase,
            in_bytes=got,
            in_expected=expected,
            in_skipped=cached,
            in_files=s.files_opened - self._base[1],
            out_bytes=s.bytes_committed - self._base[2],
            out_pending=self.server.bytes_in_flight(),
            out_files=s.files_committed - self._base[3],
            elapsed=round(now - self._started, 3),
            rate=round(rate, 1),
            eta=None if eta is None else round(eta, 1),
        )


async def watch(tracker: Tracker, callback: Callback, interval: float = 1.0) -> None:
    """Call ``callback`` with a snapshot every ``interval`` seconds until cancelled;
    the caller sends the last one (``finish``) once the job is done."""
    import trio

    while True:
        callback(tracker.snapshot())
        await trio.sleep(interval)


def finish(tracker: Tracker, callback: Callback) -> None:
    tracker.phase = "done"
    callback(tracker.snapshot())


def describe(p: Progress) -> str:
    """The figures as one plain line (the terminal line's text; ``status`` uses it)."""
    line = f"in {human_size(p.in_bytes)}"
    if p.in_expected:
        line += f" of {human_size(p.in_expected)}"
    line += f" at {human_size(p.rate)}/s"
    if p.eta is not None:
        line += f", ETA {int(p.eta) // 60}:{int(p.eta) % 60:02d}"
    if p.in_skipped:
        line += f", {human_size(p.in_skipped)} cached"
    line += f" | out {human_size(p.out_bytes)} in {p.out_files} files"
    if p.out_pending:
        line += f", {human_size(p.out_pending)} pending"
    return line


class TerminalLine:
    """The progress as one bottom line on a terminal (stderr), out of the job's way.

    The newest line made is the one ``LogHandler`` steps around (a process shows one)."""

    current: TerminalLine | None = None

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console

        self._stream = stream or sys.stderr
        self._console = Console(file=self._stream, force_terminal=True, highlight=False)
        self._shown = False
        self._at_line_start = True  # the job's last output byte ended a line
        self._last: Progress | None = None
        # Log lines may come from worker threads (hashing): one writer at a time.
        self._lock = threading.RLock()
        TerminalLine.current = self

    def show(self, p: Progress) -> None:
        with self._lock:
            self._last = p
            if not self._at_line_start:
                return  # drawing now would tear the job's unfinished line
            from rich.text import Text

            text = Text.assemble(("topyaz-mount ", "dim"), (p.phase, "bold"), " ", describe(p))
            text.truncate(max(self._console.width - 1, 10), overflow="ellipsis")
            with self._console.capture() as captured:
                self._console.print(text, end="")
            self._write("\r" + captured.get() + "\x1b[K")
            self._shown = True

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self._write("\r\x1b[K")
                self._shown = False

    def close(self) -> None:
        """Cleared for good: nothing after this draws it again."""
        with self._lock:
            self.clear()
            self._last = None
            if TerminalLine.current is self:
                TerminalLine.current = None

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Write whole lines of our own: the line is cleared first and redrawn after."""
        with self._lock:
            shown = self._shown
            self.clear()
            try:
                yield
            finally:
                if shown and self._last is not None:
                    self.show(self._last)

    def around(self, sink: Sink) -> Sink:
        """``sink`` with the line cleared before the job's bytes are written."""

        def write(data: bytes) -> None:
            with self._lock:
                self.clear()
                sink(data)
                if data:
                    self._at_line_start = data.endswith(b"\n")

        return write

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


class JsonLines:
    """One JSON object per snapshot, a line each, on ``stream`` (stderr)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr

    def show(self, p: Progress) -> None:
        self._stream.write(json.dumps(p.as_dict(), sort_keys=True) + "\n")
        self._stream.flush()


def aside() -> contextlib.AbstractContextManager[None]:
    """Around writing a line of our own on stderr: the current line's ``aside``, if any."""
    line = TerminalLine.current
    return line.aside() if line is not None else contextlib.nullcontext()


class LogHandler(logging.StreamHandler):
    """Log lines on stderr that step around the progress line, so neither tears."""

    def emit(self, record: logging.LogRecord) -> None:
        with aside():
            super().emit(record)
