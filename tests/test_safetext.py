"""Remote text printed in the client's own lines cannot act on the terminal."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from topyaz_mount.safetext import printable


def test_terminal_escapes_are_shown_not_sent():
    assert printable("a\x1b]52;c;Zm9v\x07b") == "a\\x1b]52;c;Zm9v\\x07b"  # OSC 52 clipboard
    assert printable("x\x1b[2J\rtopyaz-mount: fake") == "x\\x1b[2J\\x0dtopyaz-mount: fake"
    assert printable("ok\ntopyaz-mount: fake") == "ok\\x0atopyaz-mount: fake"
    assert printable("\x9b31m") == "\\x9b31m"  # C1 CSI
    assert printable("\u202egnp.exe") == "\\u202egnp.exe"  # bidi override


def test_ordinary_names_unchanged():
    assert printable("Café photo – 写真 01.png") == "Café photo – 写真 01.png"
    assert printable(b"out/r\xc3\xa9sum\xc3\xa9.jpg") == "out/résumé.jpg"


def test_bytes_that_are_not_utf8_become_escapes():
    assert printable(b"a\xff\x1b") == "a\\xff\\x1b"


def test_a_backslash_cannot_forge_an_escape():
    assert printable("a\\x1b") == "a\\\\x1b"


@given(st.one_of(st.text(), st.binary()))
def test_output_never_holds_a_control_character(text):
    out = printable(text)
    unsafe = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
    assert not any(unicodedata.category(ch) in unsafe for ch in out), out
