"""Content-addressed cache on the remote disk, shared by all sessions of the user.

Objects live at ``objects/<hex[:2]>/<hex>``, named by their blake3. They are written
under ``tmp/``, hashed, and renamed into place, so two sessions fetching the same
content at once both end with one good object. An object is verified against its name
the first time a process uses it; a bad one is deleted and fetched again. While a
session reads an object it holds a shared ``flock`` on it; eviction (least recently
used first, by mtime, which ``use`` refreshes) skips objects someone holds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..wire.hashing import hash_fd
from . import hostos, kept
from .filecopy import clone_or_copy

# Committed outputs up to this size become store objects too; bigger ones (a long
# video) would cost more disk than a later transfer saves.
OUTPUT_KEEP_LIMIT = 1 << 30

log = logging.getLogger(__name__)


def _still_at(path: Path, st: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``st`` is of (not lent or replaced)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def default_cap(path: Path) -> int:
    """A sensible default: a quarter of the free space, at most 50 GiB."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return 10 << 30
    return min(free // 4, 50 << 30)


@dataclass
class StoreStats:
    objects: int
    bytes: int
    cap: int
    hits: int
    misses: int
    bytes_saved: int
    kept_bytes: int = 0

    def as_dict(self) -> dict[str, int | float]:
        total = self.hits + self.misses
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "cap": self.cap,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / total, 4) if total else 0.0,
            "bytes_saved": self.bytes_saved,
            "kept_bytes": self.kept_bytes,
        }


class ContentStore:
    def __init__(self, root: Path, cap: int | None = None) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cap = cap if cap is not None else default_cap(root)
        self._verified: set[bytes] = set()
        # Outputs kept from failed sessions share the cap (kept.py); measured once a
        # session, since only a session's end adds to them.
        self.kept_bytes = kept.total_bytes(root)

        self.hits = 0
        self.misses = 0
        self.bytes_saved = 0

    def path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.objects / h[:2] / h

    def has(self, digest: bytes, size: int) -> bool:
        """Cheap existence check (no verification) for answering a manifest."""
        try:
            return os.stat(self.path(digest)).st_size == size
        except OSError:
            return False

    def open(self, digest: bytes, size: int) -> int | None:
        """A read fd (holding a shared lock) of a good object, or None if we lack it."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | hostos.CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            hostos.lock(fd, exclusive=False)
            st = os.fstat(fd)
            if not _still_at(path, st):
                os.close(fd)  # lent to a session's tree while we waited for the lock
                return None
            if st.st_size != size or not self._verify(fd, digest):
                log.warning("cache object %s is damaged; fetching it again", path.name)
                os.close(fd)
                self._remove(path)
                return None
            os.utime(path)  # least recently used = oldest mtime
        except OSError:
            os.close(fd)
            return None
        return fd

    def _verify(self, fd: int, digest: bytes) -> bool:
        if digest in self._verified:
            return True
        ok = hash_fd(fd) == digest
        if ok:
            self._verified.add(digest)
        return ok

    def new_temp(self, size: int) -> tuple[int, Path]:
        name = self.tmp / f"{os.getpid()}-{time.monotonic_ns()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | hostos.CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        return fd, name

    def add(self, temp: Path, fd: int, expect: bytes | None) -> bytes:
        """Hash a finished temp file and move it into place; returns its digest.

        ``expect`` is the hash the client announced, if any: a mismatch means the bytes
        changed on the way, and nothing is stored.
        """
        try:
            digest = hash_fd(fd)
            if expect is not None and digest != expect:
                raise OSError(errno.EIO, "received content does not match the client's hash")
            final = self.path(digest)
            final.parent.mkdir(exist_ok=True, mode=0o700)
            hostos.lock(fd, exclusive=False)  # ours before anyone can see it: not evictable
            existed = final.exists()
            os.rename(temp, final)  # atomic; a concurrent identical object just replaces
        except BaseException:
            self._remove(temp)  # whatever went wrong, no temp file stays behind
            raise
        self._verified.add(digest)
        total = self._add_to_total(0 if existed else os.fstat(fd).st_size)
        if total + self.kept_bytes > self.cap:  # scan (and evict) only when over the cap
            self.enforce_cap()
        return digest

    def copy_in(self, fd: int, digest: bytes, size: int) -> None:
        """Keep a copy of an output we hashed ourselves."""
        if self.has(digest, size):
            return
        temp_fd, temp = self.new_temp(size)
        try:
            clone_or_copy(fd, temp_fd, size)
            final = self.path(digest)
            final.parent.mkdir(exist_ok=True, mode=0o700)
            os.rename(temp, final)
        except OSError:
            self._remove(temp)
            raise
        finally:
            os.close(temp_fd)
        self._verified.add(digest)
        if self._add_to_total(size) + self.kept_bytes > self.cap:
            self.enforce_cap()

    def lend(self, digest: bytes, size: int, dest: Path) -> bool:
        """Move the object to ``dest`` (a stage tree's file: no byte copied, where the
        file system has no reflink) if no session holds it open; False otherwise.

        The store lacks it until ``take`` brings it back unchanged at the session's
        end: a job that writes into its input never writes into the store."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | hostos.CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            hostos.lock(fd, exclusive=True, wait=False)  # as eviction: nobody reads it
            st = os.fstat(fd)
            if st.st_size != size or not _still_at(path, st):
                return False
            os.replace(path, dest)
        except OSError:  # BlockingIOError: a session reads it; it stays, a copy goes
            return False
        finally:
            os.close(fd)
        self._verified.discard(digest)
        self._add_to_total(-size)
        return True

    def take(self, path: Path, digest: bytes, size: int) -> bool:
        """Make a file whose content we know an object by moving it, no byte copied
        (a staged tree's file at its session's end, which would be deleted anyway).

        Not marked verified: as any object, it is hashed at its first open in a
        session, so a file that changed unseen is found damaged there, not served."""
        if self.has(digest, size):
            return False
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        os.replace(path, final)
        self._verified.discard(digest)
        if self._add_to_total(size) + self.kept_bytes > self.cap:
            self.enforce_cap()
        return True

    def discard_temp(self, temp: Path) -> None:
        self._remove(temp)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # --- size, eviction, statistics -------------------------------------------------

    def _scan(self) -> list[tuple[float, int, Path]]:
        entries = []
        for sub in self.objects.iterdir() if self.objects.is_dir() else []:
            try:
                with os.scandir(sub) as it:
                    for e in it:
                        try:
                            st = e.stat()
                        except FileNotFoundError:
                            continue
                        entries.append((st.st_mtime, st.st_size, Path(e.path)))
            except NotADirectoryError:
                continue
        return entries

    def enforce_cap(self, cap: int | None = None, *, with_kept: bool = True) -> int:
        """Evict least recently used objects nobody holds until under ``cap``; then, if
        outputs kept on the remote still exceed it, kept sessions oldest first."""
        cap = self.cap if cap is None else cap
        entries = sorted(self._scan())
        total = sum(size for _, size, _ in entries)
        kept_bytes = kept.total_bytes(self.root) if with_kept else 0
        freed = 0
        for _, size, path in entries:
            if total + kept_bytes <= cap:
                break
            try:
                fd = os.open(path, os.O_RDONLY | hostos.CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                hostos.lock(fd, exclusive=True, wait=False)
            except BlockingIOError:
                os.close(fd)
                continue  # a session is reading it
            try:
                self._remove(path)
                total -= size
                freed += size
            finally:
                os.close(fd)
        self._write_total(total)
        if with_kept:
            if total + kept_bytes > cap:
                gone = kept.evict_oldest(self.root, total + kept_bytes - cap)
                kept_bytes -= gone
                freed += gone
            self.kept_bytes = kept_bytes
        return freed

    # The store's size is kept in one small file that every session updates under a
    # lock, so no session has to scan objects/ on every insert (quadratic for a batch
    # of small files) and each still sees what the others added.

    def _add_to_total(self, delta: int) -> int:
        with self._locked():
            try:
                total = int((self.root / "objects.size").read_text()) + delta
            except (OSError, ValueError):
                total = sum(size for _, size, _ in self._scan())
            self._write_total(total)
        return total

    def _write_total(self, total: int) -> None:
        path = self.root / "objects.size"
        tmp = path.with_name(f"objects.size.{os.getpid()}")
        tmp.write_text(str(total))
        os.replace(tmp, path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / "counters.lock", os.O_RDWR | os.O_CREAT | hostos.CLOEXEC, 0o600)
        try:
            hostos.lock(fd, exclusive=True)
            yield
        finally:
            os.close(fd)

    def clear_stale_temps(self, older_than: float = 3600) -> None:
        now = time.time()
        for entry in self.tmp.iterdir():
            try:
                if now - entry.stat().st_mtime > older_than:
                    entry.unlink()
            except OSError:
                pass

    def stats(self) -> StoreStats:
        entries = self._scan()
        persisted = self._load_counters()
        return StoreStats(
            len(entries),
            sum(size for _, size, _ in entries),
            self.cap,
            persisted["hits"] + self.hits,
            persisted["misses"] + self.misses,
            persisted["bytes_saved"] + self.bytes_saved,
            kept.total_bytes(self.root),
        )

    def _counters_path(self) -> Path:
        return self.root / "counters.json"

    def _load_counters(self) -> dict[str, int]:
        try:
            data = json.loads(self._counters_path().read_text())
            return {k: int(data.get(k, 0)) for k in ("hits", "misses", "bytes_saved")}
        except (OSError, ValueError):
            return {"hits": 0, "misses": 0, "bytes_saved": 0}

    def save_counters(self) -> None:
        """Add this process's counters to the persisted ones (under a lock)."""
        with self._locked():
            data = self._load_counters()
            data["hits"] += self.hits
            data["misses"] += self.misses
            data["bytes_saved"] += self.bytes_saved
            tmp = self._counters_path().with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self._counters_path())
            self.hits = self.misses = self.bytes_saved = 0

    def clear(self) -> int:
        """Remove every object nobody holds; returns bytes freed (kept outputs stay)."""
        freed = self.enforce_cap(0, with_kept=False)
        try:
            self._counters_path().unlink()
        except FileNotFoundError:
            pass
        return freed
