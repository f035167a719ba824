"""The FUSE backend: the root mounted at the session mountpoint (``fs.py`` serves it).

Every read and write of the job reaches the agent as it happens: inputs stream in
through the read cache, outputs land in the spool and go home at their close.
pyfuse3 is imported only here (and in ``fs.py``), so the stage backend runs on hosts
that cannot install it.
"""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path
from typing import Any

import trio

from ..wire import proto
from .backend import BackendContext
from .spool import SpoolFile

log = logging.getLogger(__name__)


# pyfuse3 waits until /dev/fuse is readable, then reads it with a *blocking* read on
# the trio thread, holding the GIL. A request withdrawn in between (its process got a
# fatal signal before we read it, or an INTERRUPT dropped because we answered the
# request it interrupts, both of which the teardown's kill of the job provokes) leaves
# nothing to read: the whole agent then sleeps in that read until the next request,
# and after a link cut, with the job gone, none comes (seen: 2 runs in 11 kept their
# mount, session dir and a zombie job). A timer signal interrupts that read: EINTR,
# which libfuse reports and pyfuse3 answers by waiting for readability again.
UNBLOCK_EVERY = 1.0


def _interrupt_only(signum: int, frame: Any) -> None:
    """SIGALRM's handler: its only job is to make the blocking read return EINTR."""


class Mount:
    """The pyfuse3 main loop as a task, with an unmount that is safe to repeat."""

    def __init__(self, ops: Any, mountpoint: Path) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self.mounted = False
        self.loop_done = trio.Event()

    def mount(self) -> None:
        import pyfuse3

        options = set(pyfuse3.default_options)
        options |= {"fsname=topyaz-mount", "subtype=topyaz-mount", "auto_unmount"}
        try:
            pyfuse3.init(self.ops, str(self.mountpoint), options)
        except RuntimeError as e:
            raise OSError(errno.EIO, f"mounting {self.mountpoint} failed: {e}") from None
        self.mounted = True

    async def serve(self) -> None:
        import pyfuse3

        signal.signal(signal.SIGALRM, _interrupt_only)
        signal.siginterrupt(signal.SIGALRM, True)
        signal.setitimer(signal.ITIMER_REAL, UNBLOCK_EVERY, UNBLOCK_EVERY)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=128)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.loop_done.set()

    async def unmount(self) -> None:
        import pyfuse3

        if not self.mounted:
            return
        self.mounted = False
        pyfuse3.terminate()
        with trio.move_on_after(10):
            await self.loop_done.wait()
        pyfuse3.close(unmount=True)


class FuseBackend:
    """The root as a FUSE mount served by ``fs.MountOps``."""

    name = "fuse"
    plain_directory = False

    def __init__(self, ctx: BackendContext) -> None:
        from .fs import MountOps

        self.ctx = ctx
        self.ops = MountOps(
            ctx.link, ctx.cache, ctx.spool, timeout=ctx.cache_timeout, mountpoint=ctx.mountpoint
        )
        self.ops.owner_of = ctx.job_of_pid
        self.ops.policy = ctx.policy
        self.mount = Mount(self.ops, ctx.mountpoint)

    def start(self) -> None:
        self.mount.mount()
        self.ctx.nursery.start_soon(self.mount.serve)

    @property
    def ready(self) -> bool:
        return self.mount.mounted

    def inputs(self, job: int, entries: list[proto.ManifestEntry]) -> None:
        """Nothing to do: the shared prefetch pulls them, the job's opens find them."""

    async def prepare(self, job: int, run: proto.Run) -> None:
        """The mount serves every path on demand; the directories the client sent along
        (the way to the job's working directory) are known from here on."""
        self.ops.known_directories(run.dirs)

    async def settle(self, job: int, alone: bool) -> None:
        """Wait for the kernel to release the job's files, then for their commits.

        A job that ran alone settles every output (even one written by a process
        that escaped its ancestry); with others running, only the files its own
        processes opened, so it neither waits for nor commits half of theirs.
        """
        spool = self.ctx.spool
        with trio.move_on_after(10):
            await self.ops.stats.wait_writers_gone(job, everyone=alone)
        for sf in spool.dirty_files():
            if alone or sf.owner == job:
                if sf.writers:
                    log.warning("committing %r although it is still open", sf.path)
                spool.schedule(sf)
        await spool.wait_idle(job, everyone=alone)

    def committed(self, sf: SpoolFile, digest: bytes, size: int) -> None:
        """A copy into the store (the spool file goes with the session)."""
        self.ctx.cache.keep_output(sf.fd, digest, size)

    def take_refused(self, job: int, *, everyone: bool) -> list[proto.Refused]:
        return self.ops.take_refused(job, everyone=everyone)

    async def invalidate(self, paths: list[bytes]) -> None:
        await self.ops.invalidate(paths)

    async def ending(self) -> None:
        """Nothing to do: the spool marks the files a writer still has open."""

    async def quiesce(self) -> None:
        """Nothing to do: what the job wrote is in the spool already."""

    async def stop(self) -> None:
        from .session import unmount

        await self.mount.unmount()
        unmount(self.ctx.mountpoint)  # if pyfuse3 could not, detach it lazily ourselves
