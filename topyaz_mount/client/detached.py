"""The client's record of a detachable session, for ``topyaz-mount attach`` (issue 14).

A new client process that takes a session over (the client crashed, or from another
shell) needs what only the client knew: the session's id and secret, the host, the root
it serves and its write policy, and how far each job's output was written out. That is
one JSON file per session, 0600 in the 0700 ``detached/`` of the runtime dir
(runtime.py). The offsets are rewritten in place, one ``pwrite`` after each
piece of output is written out, so a client killed at any moment leaves them right
(or, killed between the two writes, one piece behind). The file goes when the session
ends.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..wire import resume
from . import runtime

PAGE = 4096  # the record is padded to whole pages: each rewrite is one pwrite


@dataclass
class Record:
    session: str
    secret: str
    remote: str
    root: str
    protect: list[str]  # the write policy (policy.Policy.rules)
    hide: list[str]
    read_only: bool
    command: list[str] = field(default_factory=list)
    pid: int = 0  # the client serving the session now
    # "job:fd" -> bytes of that output the client wrote out.
    offsets: dict[str, int] = field(default_factory=dict)

    def offset_list(self) -> list[list[int]]:
        out = []
        for key, n in self.offsets.items():
            job, _, fd = key.partition(":")
            out.append([int(job), int(fd), n])
        return out


def records_dir(create: bool = True) -> Path:
    path = runtime.runtime_dir(create) / "detached"
    if create:
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def path_of(session: str) -> Path:
    if not resume.SESSION_ID.match(session):
        raise UsageError(f"session {session!r}: not a session id")
    return records_dir(create=False) / f"{session}.json"


def load(session: str) -> Record:
    path = path_of(session)
    try:
        data = json.loads(path.read_text())
        return Record(**data)
    except FileNotFoundError:
        raise UsageError(
            f"unknown session {session}: no record of it in {path.parent} "
            "(a session is attached from the machine that started it)"
        ) from None
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"session {session}: unreadable record {path}: {e}") from None


class Writer:
    """The record on disk, kept up to date by the client serving the session."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.path = records_dir() / f"{record.session}.json"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self.fd, 0o600)
        self.record.pid = os.getpid()
        self._write()

    def wrote(self, job: int, fd: int, n: int) -> None:
        key = f"{job}:{fd}"
        self.record.offsets[key] = self.record.offsets.get(key, 0) + n
        self._write()

    def ran(self, argv: list[str]) -> None:
        self.record.command = list(argv)
        self._write()

    def _write(self) -> None:
        if self.fd < 0:
            return
        data = json.dumps(asdict(self.record)).encode()
        data += b" " * (-len(data) % PAGE)
        os.pwrite(self.fd, data, 0)
        if os.fstat(self.fd).st_size > len(data):
            os.ftruncate(self.fd, len(data))

    def remove(self) -> None:
        """The session ended: nothing is left to attach to."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)


def client_alive(record: Record) -> bool:
    """Whether the client that wrote the record still runs (it serves the session)."""
    if record.pid <= 0 or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
