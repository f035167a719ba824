"""Which local files a command will read, from its arguments, in the order it reads them.

Files named in argv, and the files under directory arguments (sorted, as batch tools
take them), under the root. This is a forecast for prefetching, not a rule: anything
the command opens that is not listed is still pulled on first open.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable

from .spelling import Spelling
from .translate import PathMap

MAX_INPUTS = 100_000


def _candidate(arg: str) -> str | None:
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
        value = _candidate(arg)
        if value is None:
            continue
        full = spell(os.path.join(cwd, value))
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            add(full)
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
