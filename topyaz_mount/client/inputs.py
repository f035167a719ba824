"""Which local files a command will read, from its arguments, in the order it reads them.

Files named in argv, and the files under directory arguments (sorted, as batch tools
take them), under the root. Arguments that name files without naming them one by one
count too, when what they match is under the root:

* a sequence pattern (``frames/%05d.png``, ``%d``, as ffmpeg takes it): the matching
  files in numeric order;
* a glob the local shell did not expand (quoted: ``'small/*.bin'``): the matches in
  name order, as a shell sorts them;
* a file list (``@list.txt``, or a small text file every line of which is a file under
  the root, as ``-i list.txt``): the list, then its files in its order.

This is a forecast for prefetching, not a rule: anything the command opens that is not
listed is still pulled on first open, and a hidden file the policy hides is dropped by
the manifest (``fileserver.manifest``) like any other.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Callable, Iterable

from .spelling import Spelling
from .translate import PathMap

MAX_INPUTS = 100_000
# A file list is read only up to this size (and a bigger file is no list).
MAX_LIST_BYTES = 1 << 20
_SEQUENCE = re.compile(r"%(0?)(\d*)d")
_GLOB = re.compile(r"[*?[]")


def path_word(arg: str) -> str | None:
    """The part of an argument that may be a path (``--opt=VALUE`` gives VALUE; a bare
    option gives None). The agent's stage backend reads the command line by it too."""
    if arg.startswith("--") and "=" in arg:
        return arg.partition("=")[2] or None
    if not arg or (arg.startswith("-") and "/" not in arg):
        return None
    return arg


def input_files(
    argv: Iterable[str], pm: PathMap, cwd: str, *, spell: Callable[[str], str] | None = None
) -> list[bytes]:
    """Root-relative paths of the regular files the arguments name, deduplicated, spelled
    as stored (as the translation hands them to the job, which opens them by that name)."""
    spell = spell or Spelling()
    out: list[bytes] = []
    seen: set[bytes] = set()

    def add(full: str) -> None:
        rel = pm.relative(full)
        if rel is None:
            return
        key = os.fsencode(rel)
        if key not in seen and len(out) < MAX_INPUTS:
            seen.add(key)
            out.append(key)

    for arg in argv:
        value = path_word(arg)
        if value is None:
            continue
        listed = value.startswith("@")
        full = spell(os.path.join(cwd, value[1:] if listed else value))
        try:
            st = os.lstat(full)
        except OSError:
            for path in _matches(full, pm, spell):
                add(path)
            continue
        if stat.S_ISREG(st.st_mode):
            add(full)
            if listed or st.st_size <= MAX_LIST_BYTES:
                for path in _file_list(full, st, cwd, pm, spell):
                    add(path)
        elif stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(full):
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    try:
                        if stat.S_ISREG(os.lstat(path).st_mode):
                            add(path)
                    except OSError:
                        continue
                if len(out) >= MAX_INPUTS:
                    return out
    return out


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _matches(full: str, pm: PathMap, spell: Callable[[str], str]) -> list[str]:
    """The files a sequence pattern or a glob matches, in the order they are read; none
    unless the directory they are matched in is under the root."""
    directory, _, name = full.rpartition("/")
    sequence = _SEQUENCE.search(name)
    if sequence is not None and len(_SEQUENCE.findall(name.replace("%%", ""))) == 1:
        if _GLOB.search(directory):
            return []
        return _sequence(spell(directory or "/"), name, sequence, pm)
    wild = _GLOB.search(full)
    if wild is None or pm.relative(spell(full[: wild.start()].rpartition("/")[0] or "/")) is None:
        return []
    matched: list[str] = []
    for path in glob.iglob(full):
        if len(matched) >= MAX_INPUTS:
            break
        if _regular(path):
            matched.append(path)
    return sorted(matched)


def _sequence(directory: str, name: str, sequence: re.Match[str], pm: PathMap) -> list[str]:
    """``name`` with one ``%d`` / ``%0Nd`` in ``directory``: its files in numeric order."""
    if pm.relative(directory) is None:
        return []
    head, tail = name[: sequence.start()], name[sequence.end() :]
    width = sequence.group(2)
    digits = rf"\d{{{width},}}" if width else r"\d+"
    literal = [re.escape(part.replace("%%", "%")) for part in (head, tail)]
    pattern = re.compile(f"{literal[0]}({digits}){literal[1]}")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = sorted((int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n)))
    paths = [os.path.join(directory, n) for _, n in found[:MAX_INPUTS]]
    return [p for p in paths if _regular(p)]


def _file_list(
    full: str, st: os.stat_result, cwd: str, pm: PathMap, spell: Callable[[str], str]
) -> list[str]:
    """The files a list names, one a line, if every line names a file under the root
    (relative lines: from the working directory, else from the list's own)."""
    if st.st_size > MAX_LIST_BYTES:
        return []
    try:
        with open(full, "rb") as fh:
            head = fh.read(4096)  # an image is told from a list here, unread further
            if b"\0" in head or not head.strip():
                return []
            text = (head + fh.read(MAX_LIST_BYTES)).decode()
    except (OSError, UnicodeDecodeError):
        return []
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > MAX_INPUTS or "\0" in text:
        return []
    for base in (cwd, os.path.dirname(full)):
        paths = [spell(os.path.join(base, ln)) for ln in lines]
        if all(_regular(p) and pm.relative(p) is not None for p in paths):
            return paths
    return []
