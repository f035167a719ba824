"""How a job sees the client's root: the one seam between the session and a backend.

The session (``session.py``) owns everything shared: job control, the content store,
the read cache (with its manifest prefetch and window) and the spool that commits
outputs home. A backend only decides how the root appears at the session mountpoint:

- ``fuse`` (``fuse_backend.py``): a FUSE mount; reads and writes go through the agent
  as the job makes them.
- ``stage`` (``stage_backend.py``): a plain directory tree, filled with the job's
  inputs before it starts and scanned for its outputs while and after it runs; for
  hosts without FUSE (containers, macOS, Windows).

Either way the mountpoint path is the same, so the client's path translation is one
prefix swap whatever the backend.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..policy import Policy
from ..wire import proto
from .fusecheck import fuse_problem
from .link import ClientLink
from .readcache import ReadCache
from .spool import Spool, SpoolFile

log = logging.getLogger(__name__)

CHOICES = ("auto", "fuse", "stage")


@dataclass
class BackendContext:
    """What the session shares with its backend."""

    link: ClientLink
    cache: ReadCache
    spool: Spool
    nursery: trio.Nursery
    session_dir: Path
    mountpoint: Path
    cache_timeout: float  # how long the job's kernel may trust what it saw (FUSE)
    policy: Policy | None
    job_of_pid: Callable[[int], int | None]
    running_jobs: Callable[[], list[int]]


class Backend(Protocol):
    name: str
    # The root is a plain directory (no FUSE): a job's process may chdir into it
    # while the agent forks (see job.py).
    plain_directory: bool

    def start(self) -> None:
        """Make the root appear at the mountpoint (raises OSError if it cannot)."""

    @property
    def ready(self) -> bool:
        """Whether jobs may start (mounted, tree in place)."""

    def inputs(self, job: int, entries: list[proto.ManifestEntry]) -> None:
        """The manifest of ``job``, which has not started yet."""

    async def prepare(self, job: int, run: proto.Run) -> None:
        """Everything ``job`` needs is in place before it starts."""

    async def settle(self, job: int, alone: bool) -> None:
        """``job`` ended: commit its outputs and wait for the commits.

        ``alone``: no other job runs, so every pending output is this job's."""

    def committed(self, sf: SpoolFile, digest: bytes, size: int) -> None:
        """An output is home: the content store may keep it, so a later job that
        reads it needs no transfer."""

    def take_refused(self, job: int, *, everyone: bool) -> list[proto.Refused]:
        """Writes the backend refused for ``job`` under the client's policy."""

    async def invalidate(self, paths: list[bytes]) -> None:
        """These paths changed on the client (a watching client's push)."""

    async def ending(self) -> None:
        """The session ends and its jobs are about to be killed: note which outputs
        they still write (kept as partial, should they have to be kept)."""

    async def quiesce(self) -> None:
        """The session is ending and its jobs are gone: hand every output written so
        far to the spool, which commits it or keeps it on the remote."""

    async def stop(self) -> None:
        """Take the root away from the mountpoint; safe to repeat."""


def fuse_unusable_reason() -> str | None:
    """Why a FUSE mount cannot work here (checked before trying one), or None."""
    problem = fuse_problem()
    if problem is not None:
        return problem
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


def open_backend(choice: str, ctx: BackendContext) -> tuple[Backend, str]:
    """The backend ``choice`` asks for, started, and a line on why when ``auto`` fell
    back to staging (the client shows it under ``-v``).

    ``auto`` tries a real mount (the test of whether FUSE works) and falls back to the
    stage backend on any failure; ``fuse`` fails as before."""
    if choice not in CHOICES:
        raise OSError(
            errno.EINVAL, f"unknown backend {choice!r} (choose one of {', '.join(CHOICES)})"
        )
    problem = None
    if choice != "stage":
        problem = fuse_unusable_reason()
        # The platform test keeps the FUSE modules out of the stage path even for the
        # type checker (mypy --platform darwin/win32 does not follow this import).
        if problem is None and sys.platform.startswith("linux"):
            from .fuse_backend import FuseBackend

            fuse = FuseBackend(ctx)
            try:
                fuse.start()
                return fuse, ""
            except OSError as e:
                if choice == "fuse":
                    raise
                problem = e.strerror or str(e)
        if choice == "fuse":
            raise OSError(errno.ENODEV, f"FUSE is not usable on this host: {problem}")
    note = f"FUSE is not usable on this host ({problem}): staging files instead" if problem else ""
    if note:
        log.info("%s", note)
    from .stage_backend import StageBackend

    stage = StageBackend(ctx)
    stage.start()
    return stage, note
