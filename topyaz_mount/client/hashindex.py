"""The client's memory of content hashes: (device, inode, size, mtime, ctime) -> blake3.

An unchanged file is never hashed twice; a file whose size, mtime or ctime changed is
hashed again. The ctime matters: tools that edit in place and then restore the mtime
(``touch -r``, ``exiftool -P``, ``rsync -t`` onto the same inode) cannot restore it,
so an edit is never mistaken for the old content. (A rename also changes the ctime;
that costs one re-hash and is still a cache hit.) Kept in SQLite in the user's cache dir
so it survives runs, and safe to share between concurrent topyaz-mount processes
(SQLite's own locking, short transactions).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from ..wire.hashing import hash_fd

log = logging.getLogger(__name__)

# A file the job opens that we have not hashed yet is hashed on the spot up to this size
# (blake3 runs at several GB/s, so this is a few tens of milliseconds); a larger one
# starts streaming at once and is hashed in order as its chunks go out.
QUICK_HASH_LIMIT = 64 << 20
# Before the command starts, unhashed inputs named in its arguments are hashed up to this
# many bytes in all, so that renamed, copied or touched inputs are cache hits.
MANIFEST_HASH_BUDGET = 1 << 30


def default_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("topyaz-mount")) / "hashes.sqlite"


class HashIndex:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        self.hashed_bytes = 0  # what this process had to hash (for --stats and tests)
        self.hashed_files = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS file_hashes (dev INTEGER, ino INTEGER,"
                " size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, hash BLOB,"
                " PRIMARY KEY (dev, ino))"
            )
        except sqlite3.Error as e:
            log.warning("hash index %s unusable (%s); hashing without memory", self.path, e)
            self._db = None

    def lookup(self, st: os.stat_result) -> bytes | None:
        if self._db is None:
            return None
        try:
            row = self._db.execute(
                "SELECT size, mtime_ns, ctime_ns, hash FROM file_hashes WHERE dev=? AND ino=?",
                (st.st_dev, st.st_ino),
            ).fetchone()
        except sqlite3.Error:
            return None
        if row and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return bytes(row[3])
        return None

    def remember(self, st: os.stat_result, digest: bytes) -> None:
        self.remember_many([(st, digest)])

    def remember_many(self, known: list[tuple[os.stat_result, bytes]]) -> None:
        """Each file's hash, in one transaction (a listing's worth of small files)."""
        if self._db is None or not known:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, d)
                        for st, d in known
                    ],
                )
        except sqlite3.Error as e:
            log.debug("could not remember hashes: %s", e)

    def hash_of(self, fd: int) -> bytes:
        """The file's hash, from memory if it is unchanged, else computed and remembered."""
        st = os.fstat(fd)
        known = self.lookup(st)
        if known is not None:
            return known
        digest = hash_fd(fd)
        self.hashed_bytes += st.st_size
        self.hashed_files += 1
        if os.fstat(fd).st_ctime_ns == st.st_ctime_ns:  # not changed while we read it
            self.remember(st, digest)
        return digest

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
