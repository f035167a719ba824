"""The wheel users install holds every module of the source tree (a hand-written
package list once shipped one without ``agent/``), and nothing of the tests or tools."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR / "tools"))

import testhost  # noqa: E402


def _source_files() -> set[str]:
    package = REPO_DIR / "topyaz_mount"
    return {
        str(p.relative_to(REPO_DIR))
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")
    }


def test_wheel_holds_every_module_of_the_source_tree():
    wheel = testhost.build_wheel()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    packaged = {n for n in names if n.startswith("topyaz_mount/")}
    assert packaged == _source_files()
    assert "topyaz_mount/py.typed" in packaged
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
