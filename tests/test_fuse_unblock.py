"""Regression: the agent's FUSE loop must never sleep forever in a read of /dev/fuse.

pyfuse3 waits until /dev/fuse is readable and then reads it with a blocking read on the
trio thread. A request withdrawn in between (its process killed before the read, which
the agent's own teardown does to the job) left nothing to read, and the whole agent slept
until the next request: after a link cut none came, and the mount, the session dir and a
zombie job stayed (2 runs in 11).

This makes the race happen on purpose, in a process of its own: a second trio task
watches the same device, and when a request is pending it kills the process that made
it and gives the kernel time to withdraw it before the loop goes on; half the time
pyfuse3's reader runs after it. Without the fix the process hangs (the test kills it
after a generous deadline); with it, every round ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import errno, os, stat, subprocess, sys, time
from pathlib import Path
import pyfuse3, trio
from topyaz_mount.agent.fuse_backend import Mount

class Ops(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        return attr

    async def lookup(self, parent_inode, name, ctx=None):
        raise pyfuse3.FUSEError(errno.ENOENT)

def device_fd():
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse":
                return int(fd)
        except OSError:
            pass
    raise RuntimeError("no /dev/fuse fd")

async def main(mountpoint, rounds):
    mount = Mount(Ops(), Path(mountpoint))
    mount.mount()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mount.serve)
        watch = os.dup(device_fd())
        for i in range(rounds):
            asker = subprocess.Popen(["stat", f"{mountpoint}/x{i}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await trio.lowlevel.wait_readable(watch)
            asker.kill()
            time.sleep(0.1)  # on purpose, on the trio thread: the request is withdrawn now
            await trio.to_thread.run_sync(asker.wait)
            print("round", i, flush=True)
        await mount.unmount()
        nursery.cancel_scope.cancel()
    print("done", flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "no FUSE here"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


def test_a_withdrawn_request_does_not_block_the_loop(tmp_path):
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(mountpoint), "16"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    rounds = out.decode().count("round")
    assert proc.returncode == 0 and out.endswith(b"done\n"), (
        f"the FUSE loop hung after {rounds} of 16 rounds (exit {proc.returncode}): "
        f"{err.decode()[-2000:]}"
    )
