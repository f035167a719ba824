"""Prefetch learned from the job: which files of a directory it will open next.

Inputs the command line does not name (a glob the remote shell expands, an image
sequence, a tree a tool walks) are announced by no manifest, so each would cost its own
round trips before its bytes flow. But such jobs open the files of a directory in an
order we can see: name order (a shell glob, ``sorted(os.listdir())``), numeric order
(``%d`` sequences: ``2`` before ``10``), or the listing's order. Once the job is seen
following one (two files opened one after the other in it, or the first file of a
directory the job itself has just listed), the rest of that directory is prefetched in
that order, through the read cache's window, at most ``budget`` bytes ahead of the
job. An open that leaves the order stops it. At the end of a directory the prefetch
goes on into the next sibling directory in name order (a recursive walk), one
directory ahead of the job.

Only files with the suffix of the file being followed take part (a glob ``*.png`` in a
directory that also holds ``.txt`` files), and files the manifest named are left to
the manifest's prefetch. This module only decides; ``fs.py`` lists and ``readcache.py``
pulls.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..wire import proto

# Bytes prefetched ahead of the job in one directory.
DIR_BUDGET = 256 << 20
# ... until the job has taken a step in the order (two files one after the other): a
# job that lists a directory and opens its first file may want no other (Python lists
# every directory on its path, then opens one input), so the guess is kept small, and a
# file bigger than this is never guessed.
GUESS_BUDGET = 1 << 20
# A job may skip this many files of the order and still be following it (a glob that
# leaves out a few names).
MAX_SKIP = 1
# Opens in a directory not listed yet that are kept to be judged once it is.
REPLAYED = 8
_DIGITS = re.compile(rb"(\d+)")


def natural_key(name: bytes) -> tuple:
    """``f2`` before ``f10``: numbers compare as numbers (``%d`` sequences)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(name)))


def suffix(name: bytes) -> bytes:
    return name.rpartition(b".")[2] if b"." in name else b""


@dataclass
class Track:
    """The job's walk through one suffix group of a directory, in each candidate order."""

    orders: list[list[bytes]]
    places: list[dict[bytes, int]]  # each name's position in each order
    last: list[int | None]  # the job's last position in each order (None: not in it)
    following: int | None = None  # which order the job follows, once seen
    stepped: bool = False  # the job went from one file of it to the next
    issued: int = 0  # files of the followed order handed to the prefetch so far


@dataclass
class Dir:
    files: dict[bytes, proto.Attr]
    subdirs: list[bytes]
    by_job: bool  # the job listed it itself (readdir), not a lookup of ours
    tracks: dict[bytes, Track] = field(default_factory=dict)
    continued: bytes | None = None  # the suffix a walk carried into this directory


@dataclass
class Ahead:
    """What to do after an open: files to prefetch (in order), a directory to list."""

    files: list[tuple[bytes, proto.Attr]] = field(default_factory=list)
    list_dir: bytes | None = None


def _join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name


class Follower:
    def __init__(self, budget: int = DIR_BUDGET) -> None:
        self.budget = budget
        self._dirs: dict[bytes, Dir] = {}
        self._unlisted: dict[bytes, list[bytes]] = {}  # opens in directories not listed
        self._walk_into: dict[bytes, bytes] = {}  # directory listed ahead -> suffix
        self.named: set[bytes] = set()  # paths the manifest announced

    def listed(
        self, directory: bytes, entries: Iterable[tuple[bytes, proto.Attr]], *, by_job: bool
    ) -> Ahead:
        """The client's listing of ``directory``. Replays opens seen before it, and
        continues a walk that asked for it."""
        files: dict[bytes, proto.Attr] = {}
        subdirs: list[bytes] = []
        for name, attr in entries:
            if stat.S_ISREG(attr.mode):
                files[name] = attr
            elif stat.S_ISDIR(attr.mode):
                subdirs.append(name)
        old = self._dirs.get(directory)
        if old is not None and old.files.keys() == files.keys():
            old.files = files  # the same names: keep what we learned of the job
            old.by_job = old.by_job or by_job
            return Ahead()
        d = self._dirs[directory] = Dir(files, sorted(subdirs), by_job)
        ahead = Ahead()
        carried = self._walk_into.pop(directory, None)
        if carried is not None:
            d.continued = carried
            track = self._track(d, carried)
            if track is not None:
                track.following, track.last[0] = 0, -1
                ahead.files = self._issue(directory, d, track, -1)
        replayed = [_join(directory, name) for name in self._unlisted.pop(directory, [])]
        for path in replayed:
            more = self.opened(path)
            ahead.files += more.files
            ahead.list_dir = ahead.list_dir or more.list_dir
        ahead.files = [(p, a) for p, a in ahead.files if p not in replayed]  # opened already
        return ahead

    def forget(self, directory: bytes) -> None:
        """The directory changed on the client: what we knew of it is gone."""
        self._dirs.pop(directory, None)

    def _track(self, d: Dir, group: bytes) -> Track | None:
        track = d.tracks.get(group)
        if track is None:
            names = [n for n in d.files if suffix(n) == group]
            if not names:
                return None
            by_name = sorted(names)
            by_number = sorted(names, key=natural_key)
            orders = [by_name] if by_number == by_name else [by_name, by_number]
            places = [{n: i for i, n in enumerate(o)} for o in orders]
            track = d.tracks[group] = Track(orders, places, [None] * len(orders))
        return track

    def opened(self, path: bytes) -> Ahead:
        """The job opened ``path`` (a client file) for reading."""
        directory, _, name = path.rpartition(b"/")
        if path in self.named:
            return Ahead()
        d = self._dirs.get(directory)
        if d is None:
            seen = self._unlisted.setdefault(directory, [])
            new = name not in seen
            seen.append(name)
            del seen[:-REPLAYED]
            # A second file opened in a directory nobody listed: list it, then judge (a
            # file opened again says nothing of an order, and the listing may carry
            # small files' content).
            second = new and len(set(seen)) == 2
            return Ahead(list_dir=directory if second else None)
        if name not in d.files:
            return Ahead()
        track = self._track(d, suffix(name))
        assert track is not None
        was = track.following
        in_order = []
        for i, places in enumerate(track.places):
            pos = places[name]
            last = track.last[i]
            step = pos - (last if last is not None else -1)
            first_of_listed = last is None and pos == 0 and (d.by_job or d.continued)
            if last is not None and 0 < step <= MAX_SKIP + 1:
                in_order.append(i)
                track.stepped = track.stepped or was in (None, i)
            elif first_of_listed:
                in_order.append(i)
            elif step == 0 and was == i:
                in_order.append(i)  # the same file again: still where it was
            track.last[i] = pos
        if was is not None and was not in in_order:
            track.following = None  # the job left the order: stop
            return Ahead()
        following = in_order[0] if was is None and in_order else was
        if following is None:
            return Ahead()
        track.following = following
        now = track.last[following]
        assert now is not None
        ahead = Ahead(self._issue(directory, d, track, now))
        if track.issued >= len(track.orders[following]):
            ahead.list_dir = self._next_dir(directory, d, suffix(name))
        return ahead

    def _issue(
        self, directory: bytes, d: Dir, track: Track, pos: int
    ) -> list[tuple[bytes, proto.Attr]]:
        """Files of the followed order after ``pos`` not handed out yet, within budget."""
        assert track.following is not None
        order = track.orders[track.following]
        track.issued = max(track.issued, pos + 1)
        ahead = sum(d.files[n].size for n in order[pos + 1 : track.issued])
        out: list[tuple[bytes, proto.Attr]] = []
        while track.issued < len(order):
            name = order[track.issued]
            size = d.files[name].size
            # (Once stepped, at least the next file, whatever its size: never a guess.)
            if ahead + size > self._budget(track) and (out or not track.stepped):
                break
            ahead += size
            track.issued += 1
            path = _join(directory, name)
            if path not in self.named:
                out.append((path, d.files[name]))
        return out

    def _budget(self, track: Track) -> int:
        return self.budget if track.stepped else min(self.budget, GUESS_BUDGET)

    def _next_dir(self, directory: bytes, d: Dir, group: bytes) -> bytes | None:
        """The directory a top-down walk visits after ``directory`` (its first
        subdirectory, else its next sibling in name order), to be listed ahead, once."""
        if d.subdirs:
            nxt = _join(directory, d.subdirs[0])
        else:
            if not directory:
                return None
            parent, _, name = directory.rpartition(b"/")
            p = self._dirs.get(parent)
            if p is None or name not in p.subdirs:
                return None
            i = p.subdirs.index(name)
            if i + 1 >= len(p.subdirs):
                return None
            nxt = _join(parent, p.subdirs[i + 1])
        if nxt in self._dirs or nxt in self._walk_into:
            return None
        self._walk_into[nxt] = group
        return nxt
