"""The terminal line and our own lines: a log line steps around the progress line."""

from __future__ import annotations

import io
import logging

from topyaz_mount.client import progress

FIGURES = progress.Progress("running", 1 << 20, 4 << 20, 0, 1, 0, 0, 0, 1.0, 1024.0, 3.0)


def test_a_log_line_clears_the_line_and_redraws_it_after():
    stream = io.StringIO()
    line = progress.TerminalLine(stream)
    handler = progress.LogHandler(stream)
    logger = logging.getLogger("topyaz_mount.test_progress")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        line.show(FIGURES)
        drawn = stream.getvalue()
        assert drawn.startswith("\r") and drawn.endswith("\x1b[K")
        logger.warning("a line of ours")
        assert stream.getvalue() == drawn + "\r\x1b[K" + "a line of ours\n" + drawn
        line.around(lambda data: stream.write(data.decode()))(b"half a line")
        logger.warning("while the job's line is open")  # not drawn into it again
        assert stream.getvalue().endswith("half a line" + "while the job's line is open\n")
        line.close()
        logger.warning("after the end")  # nothing to clear or redraw
        assert stream.getvalue().endswith("open\nafter the end\n")
        assert progress.TerminalLine.current is None
    finally:
        logger.removeHandler(handler)
