"""Outputs that could not be committed, kept on the remote until recovered or cleared.

Each session that kept something has ``kept/<session>/``: the files under ``files/``
at their root-relative paths, and ``manifest.json`` saying for each whether it is
complete (the job had closed it: its size and blake3 are recorded, so it can be
committed home later, verified) or partial (a writer still had it open when the
session ended; never committed), with the client root it belongs to and what the
client's file looked like then (so a recovery never overwrites a file changed since).

Kept bytes count against the content cache's cap (store.py): when over it, cache
objects nobody uses go first (they are copies of client files), then kept sessions,
oldest first: they may be the only copy of a job's work, but unbounded they filled a
remote disk (1.4 GB seen). A session still running is never evicted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from ..wire import proto
from ..wire.hashing import hash_fd
from . import hostos

if TYPE_CHECKING:
    from .spool import Spool

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def kept_root(base_dir: Path) -> Path:
    return base_dir / "kept"


class KeptSession:
    """One session's kept outputs; the directory is made on the first one."""

    def __init__(self, base_dir: Path, session_id: str, client_root: str) -> None:
        self.base_dir = base_dir
        self.dir = kept_root(base_dir) / session_id
        self.session_id = session_id
        self.client_root = client_root
        self.entries: dict[str, dict[str, Any]] = {}
        self.created = 0.0

    def keep(
        self,
        path: bytes,
        fd: int,
        *,
        complete: bool,
        mode: int,
        expect: proto.Attr | None,
        reason: str,
    ) -> Path:
        """Copy ``fd``'s bytes to the kept tree (hashing them) and record them."""
        name = os.fsdecode(path)
        dest = self.dir / "files" / name
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        hasher = blake3.blake3()
        size = os.fstat(fd).st_size
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | hostos.CLOEXEC, 0o600)
        try:
            offset = 0
            while offset < size:
                data = hostos.pread(fd, min(proto.CHUNK_SIZE, size - offset), offset)
                if not data:
                    break
                hasher.update(data)
                hostos.pwrite_all(out, data, offset)
                offset += len(data)
            os.fsync(out)
        finally:
            os.close(out)
        self.entries[name] = {
            "path": name,
            "size": offset,
            "blake3": hasher.hexdigest(),
            "complete": complete and offset == size,
            "mode": mode & 0o777,
            "expect": None if expect is None else [expect.size, expect.mtime_ns],
            "reason": reason,
        }
        self.save()
        return dest

    def save(self) -> None:
        if not self.created:
            self.created = time.time()
        data = {
            "session": self.session_id,
            "created": self.created,
            "root": self.client_root,
            "files": sorted(self.entries.values(), key=lambda e: e["path"]),
        }
        _write_json(self.dir / MANIFEST, data)


@dataclass
class KeptInfo:
    """A kept session as listed: its manifest, and its size on disk."""

    session: str
    created: float
    root: str
    files: list[dict[str, Any]]
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "created": self.created,
            "root": self.root,
            "files": self.files,
            "bytes": self.bytes,
        }


def load(base_dir: Path, session: str) -> KeptInfo | None:
    directory = kept_root(base_dir) / session
    if not directory.is_dir():
        return None
    size = _tree_size(directory)
    try:
        data = json.loads((directory / MANIFEST).read_text())
        return KeptInfo(
            session, float(data["created"]), str(data["root"]), list(data["files"]), size
        )
    except (OSError, ValueError, KeyError, TypeError):
        # Kept before manifests existed (or half written): nothing known to be whole.
        files = [
            {"path": str(p.relative_to(directory)), "size": p.stat().st_size, "complete": False}
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        ]
        return KeptInfo(session, directory.stat().st_mtime, "", files, size)


def list_all(base_dir: Path) -> list[KeptInfo]:
    """Every kept session, oldest first."""
    top = kept_root(base_dir)
    found = [load(base_dir, p.name) for p in top.iterdir()] if top.is_dir() else []
    return sorted((k for k in found if k is not None), key=lambda k: k.created)


def total_bytes(base_dir: Path) -> int:
    top = kept_root(base_dir)
    return _tree_size(top) if top.is_dir() else 0


def remove(base_dir: Path, session: str | None = None) -> int:
    """Remove one kept session (or all but those still running); returns bytes freed."""
    freed = 0
    for info in list_all(base_dir):
        if session is None and _running(base_dir, info.session):
            continue
        if session is None or info.session == session:
            shutil.rmtree(kept_root(base_dir) / info.session, ignore_errors=True)
            freed += info.bytes
    return freed


def evict_oldest(base_dir: Path, excess: int) -> int:
    """Remove kept sessions, oldest first, until ``excess`` bytes are freed; a session
    still running (its session dir exists) is skipped."""
    freed = 0
    for info in list_all(base_dir):
        if freed >= excess:
            break
        if _running(base_dir, info.session):
            continue
        log.warning("cache cap: removing outputs kept from session %s", info.session)
        shutil.rmtree(kept_root(base_dir) / info.session, ignore_errors=True)
        freed += info.bytes
    return freed


def _running(base_dir: Path, session: str) -> bool:
    return (base_dir / "sessions" / session).exists()


def forget_file(base_dir: Path, session: str, path: str) -> None:
    """A kept file went home (recovered): drop it, and the session once it is empty."""
    directory = kept_root(base_dir) / session
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return
    data["files"] = [e for e in data["files"] if e["path"] != path]
    try:
        os.unlink(directory / "files" / path)
    except OSError:
        pass
    if data["files"]:
        _write_json(directory / MANIFEST, data)
    else:
        shutil.rmtree(directory, ignore_errors=True)


async def recover(base_dir: Path, root: str, spool: Spool, this_session: str) -> proto.Recovered:
    """Commit home every complete kept output of ``root`` through the spool's commit
    path (the client verifies it and applies its write policy; a local file changed
    since is not overwritten: the output lands beside it). Each one home is dropped
    from ``kept/``; partial ones stay until cleared."""
    import trio

    committed: list[bytes] = []
    saved_as: list[bytes] = []
    failed: list[str] = []
    partial_left = 0
    for info in list_all(base_dir):
        if info.session == this_session or not root or info.root != root:
            continue
        for entry in info.files:
            if not entry.get("complete"):
                partial_left += 1
                continue
            name = entry["path"]
            where = kept_root(base_dir) / info.session / "files" / name
            try:
                fd = os.open(where, os.O_RDONLY | hostos.CLOEXEC)
            except OSError as e:
                failed.append(f"{name}: {e.strerror}")
                continue
            try:
                digest = await trio.to_thread.run_sync(hash_fd, fd)
                if digest.hex() != entry["blake3"] or os.fstat(fd).st_size != entry["size"]:
                    failed.append(f"{name}: the kept copy is damaged; not committed")
                    continue
                path = os.fsencode(name)
                if await _already_home(spool, path, entry):
                    final = path  # its commit arrived after all; the agent never heard
                else:
                    expect = entry.get("expect")
                    attr = None if not expect else proto.Attr(0, expect[0], expect[1], 0, 0)
                    mode = int(entry.get("mode", 0o644))
                    final = await spool.commit_kept(path, fd, mode, attr)
            except OSError as e:
                failed.append(f"{name}: {e.strerror or e}")
                continue
            finally:
                os.close(fd)
            committed.append(path)
            saved_as.append(final)
            forget_file(base_dir, info.session, name)
    return proto.Recovered(committed, saved_as, failed, partial_left)


async def _already_home(spool: Spool, path: bytes, entry: dict[str, Any]) -> bool:
    """Whether the client's file already has these bytes (its ``OpenRead`` answer
    carries the hash when the client knows it or can compute it quickly)."""
    try:
        handle, attr, digest = await spool.link.open_read(path)
    except OSError:
        return False
    try:
        return attr.size == entry["size"] and digest is not None and digest.hex() == entry["blake3"]
    finally:
        await spool.link.close_read(handle)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _tree_size(top: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
