"""Local paths spelled as their directories store them, whatever way they were typed.

macOS volumes are usually case-insensitive and normalization-insensitive: ``Shots/A.JPG``
opens ``shots/a.jpg``, and a name typed in NFC (a keyboard's ``é``) opens the NFD one
the Finder wrote. The remote host is case-sensitive, and its agent answers lookups from
the listings it was sent, which carry the stored names; so every local path handed to
the job (arguments, the working directory, the root, the announced inputs) is first
respelled, component by component, as its directory lists it. A name found verbatim is
kept (a case-sensitive volume pays one listing per directory, cached for the call);
otherwise the stored entry that folds to the same name *and is the same file* (device
and inode) is taken, never a guess by folding alone. What does not exist stays as typed.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable


def fold(name: str) -> str:
    """One key for the names a case- and normalization-insensitive volume confuses."""
    return unicodedata.normalize("NFD", name).casefold()


class Spelling:
    """Callable: an absolute path normalized, with its existing part spelled as stored.
    Listings are cached, so use one instance per command, not per session."""

    def __init__(
        self,
        lstat: Callable[[str], os.stat_result] = os.lstat,
        listdir: Callable[[str], list[str]] = os.listdir,
    ) -> None:
        self._lstat = lstat
        self._listdir = listdir
        self._listings: dict[str, tuple[set[str], dict[str, list[str]]] | None] = {}

    def __call__(self, path: str) -> str:
        parts = [p for p in os.path.normpath(path).split("/") if p]
        spelled = "/"
        for i, name in enumerate(parts):
            stored = self._stored(spelled, name)
            if stored is None:  # does not exist: the rest stays as typed
                return os.path.join(spelled, *parts[i:])
            spelled = os.path.join(spelled, stored)
        return spelled

    def _listing(self, directory: str) -> tuple[set[str], dict[str, list[str]]] | None:
        if directory not in self._listings:
            try:
                names = self._listdir(directory)
            except OSError:  # cannot be listed (no read permission): names stay as typed
                self._listings[directory] = None
            else:
                folded: dict[str, list[str]] = {}
                for entry in names:
                    folded.setdefault(fold(entry), []).append(entry)
                self._listings[directory] = (set(names), folded)
        return self._listings[directory]

    def _stored(self, parent: str, name: str) -> str | None:
        """The stored name of ``name`` in ``parent``; None if there is no such entry."""
        listing = self._listing(parent)
        if listing is None:
            return name
        names, folded = listing
        if name in names:
            return name
        try:
            typed = self._lstat(os.path.join(parent, name))
        except OSError:
            return None
        for entry in folded.get(fold(name), ()):
            try:
                st = self._lstat(os.path.join(parent, entry))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (typed.st_dev, typed.st_ino):
                return entry
        return name
