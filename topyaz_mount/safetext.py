"""Text from the remote made safe to print inside the client's own lines.

A compromised host chooses file names, error messages and log text. Printed raw inside a
``topyaz-mount:`` line they could write the clipboard (OSC 52), clear the screen, move the
cursor, or fake a line of ours after a newline. Every such character is shown as an
escape instead. The command's own stdout and stderr are not passed through here: they
are the job's output and travel untouched, as with ssh.
"""

from __future__ import annotations

import unicodedata

# Unicode categories shown as escapes: controls (C0, DEL, C1), format characters (bidi
# overrides that reorder what the user reads, zero-width joiners), line and paragraph
# separators, and unassigned or private code points.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str | bytes) -> str:
    """``text`` with every character that could act on a terminal shown as an escape.

    Bytes are decoded as UTF-8; bytes that are not valid UTF-8 become ``\\xNN``.
    A backslash is doubled, so an escape we print cannot be forged by the remote.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return "".join(
        "\\\\"
        if ch == "\\"
        else _escape(ch)
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES
        else ch
        for ch in text
    )
