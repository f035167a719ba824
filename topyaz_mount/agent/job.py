"""The user's command on the remote host: argv (no shell), own process group.

stdout and stderr travel to the client as ``Output`` notices as they arrive. Signals
from the client go to the whole process group, so a tool's helper processes stop too.
When the main process ends, stragglers left in its group get SIGTERM, then SIGKILL,
because an output is only complete once every process that could write it is gone.

A job may instead run on a pseudo-terminal (``topyaz-mount shell``): then it leads a
session of its own with the terminal as its controlling tty, so job control, Ctrl-C
typed into the terminal and window-size changes behave as over ``ssh -t``.

On Windows (stage backend only; not run here) the argv becomes one command line
(``winhost.command_line``), the job gets a process group and a job object of its own,
and signals map as ``winhost`` says; there is no pseudo-terminal.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable

import trio

from . import hostos, winhost

log = logging.getLogger(__name__)

STRAGGLER_GRACE = 3.0

OutputSink = Callable[[int, bytes], Awaitable[None]]


def exit_code(returncode: int) -> int:
    """A shell-style status: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Job:
    def __init__(
        self,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        stdin: bool,
        tty: tuple[int, int] | None = None,
        *,
        plain_cwd: bool = False,
    ) -> None:
        if not argv:
            raise OSError(errno.EINVAL, "empty command")
        self.argv = argv
        self.cwd = cwd
        self.env = {**os.environ, **env}
        self.want_stdin = stdin
        self.tty = tty
        self.plain_cwd = plain_cwd  # cwd is not on a FUSE mount: chdir while forking
        self.master: trio.abc.Stream | None = None  # the pty's master side
        self.master_fd = -1
        self.process: trio.Process | None = None
        self.job_object: winhost.JobObject | None = None  # Windows

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else -1

    async def start(self) -> int:
        # The child must not chdir into (or exec from) the mount while this process is
        # stuck in fork: on Python >= 3.10 subprocess may vfork, which suspends the
        # forking thread with the GIL held, so nobody could answer the kernel's FUSE
        # request and both processes would hang. `env -C DIR` does the chdir and the
        # PATH lookup in a process of its own, after our fork has returned.
        # No PR_SET_PDEATHSIG here: it fires when the *thread* that forked exits, and
        # trio forks in a worker thread that idles out after ~10 s, which would kill
        # every longer command. A dead agent's commands are ended by the next agent
        # (collect_dead_sessions reads the session's ``jobs`` file).
        # Off a mount (the stage backend) that hazard does not exist, and the fork does
        # the chdir itself: `env -C` is GNU's, and macOS has not got it.
        if sys.platform == "win32":
            return await self._start_on_windows()
        direct = self.plain_cwd and self.tty is None
        argv = self.argv if direct else ["env", "-C", self.cwd, "--", *self.argv]
        if self.tty is not None:
            return await self._start_on_pty(argv, *self.tty)
        try:
            self.process = await trio.lowlevel.open_process(
                argv,
                cwd=self.cwd if direct else None,
                env=self.env,
                stdin=subprocess.PIPE if self.want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:  # as `env` would say it
            if direct and not os.path.isdir(self.cwd):
                raise OSError(errno.ENOENT, f"{self.cwd}: no such directory") from None
            raise OSError(errno.ENOENT, f"{self.argv[0]}: command not found") from None
        return self.process.pid

    async def _start_on_windows(self) -> int:
        """The argv as one command line (no shell), in a new process group and a job
        object (stage backend: the cwd is a plain directory)."""
        if sys.platform != "win32":
            raise OSError(errno.EINVAL, "Windows job start on a host that is not Windows")
        if self.tty is not None:
            raise OSError(errno.EINVAL, "terminal jobs are not built for Windows hosts")
        try:
            self.process = await trio.lowlevel.open_process(
                winhost.command_line(self.argv),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.PIPE if self.want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                creationflags=winhost.creation_flags(),
            )
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"{self.argv[0]}: command not found") from None
        self.job_object = winhost.JobObject(self.process.pid)
        return self.process.pid

    async def _start_on_pty(self, argv: list[str], rows: int, cols: int) -> int:
        # `setsid -c` (util-linux) makes the child a session leader with the terminal
        # on its stdin as controlling tty, then execs: the pid stays the job's pid and
        # process-group id, as for a piped job, and no Python runs in the child.
        if sys.platform == "win32":
            raise OSError(errno.EINVAL, "terminal jobs are not built for Windows hosts")
        import pty

        master, slave = pty.openpty()
        try:
            set_window_size(slave, rows, cols)
            self.process = await trio.lowlevel.open_process(
                ["setsid", "-c", *argv], env=self.env, stdin=slave, stdout=slave, stderr=slave
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = trio.lowlevel.FdStream(master)
        self.master_fd = master
        return self.process.pid

    def resize(self, rows: int, cols: int) -> None:
        if self.master is not None:
            set_window_size(self.master_fd, rows, cols)

    async def run(self, sink: OutputSink) -> int:
        """Forward output until the process ends; returns its shell-style status."""
        if self.master is not None:
            return await self._run_on_pty(sink)
        proc = self.process
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, proc.stdout, 1, sink)
            nursery.start_soon(self._pump, proc.stderr, 2, sink)
            await proc.wait()
            await self._end_stragglers(proc.pid)
        assert proc.returncode is not None
        return exit_code(proc.returncode)

    async def _run_on_pty(self, sink: OutputSink) -> int:
        proc, master = self.process, self.master
        assert proc is not None and master is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, master, 1, sink)
            await proc.wait()
            await self._end_stragglers(proc.pid)
            # The terminal reads EOF (EIO) once every process holding it is gone; one
            # that left the group may still hold it, so do not wait for it for long.
            nursery.cancel_scope.deadline = trio.current_time() + 1
        await master.aclose()
        assert proc.returncode is not None
        return exit_code(proc.returncode)

    @staticmethod
    async def _pump(stream: trio.abc.ReceiveStream, fd: int, sink: OutputSink) -> None:
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(1 << 16)
                except trio.BrokenResourceError:  # a pty master whose slave closed: EIO
                    return
                if not data:
                    return
                try:
                    await sink(fd, bytes(data))
                except OSError as e:
                    # The client is gone for good (the teardown ends the job next):
                    # drain the rest, rather than end the session with the error.
                    log.info("output of the job has nowhere to go: %s", e)
                    sink = _discard

    async def _end_stragglers(self, pgid: int) -> None:
        for sig in (hostos.SIGTERM, hostos.SIGKILL):
            if not hostos.group_alive(pgid):
                return
            log.info("stopping processes left in the job's group with signal %d", sig)
            self._signal_group(pgid, sig)
            with trio.move_on_after(STRAGGLER_GRACE):
                while hostos.group_alive(pgid):
                    await trio.sleep(0.05)

    def _signal_group(self, pgid: int, sig: int) -> None:
        if self.job_object is not None:
            self.job_object.signal(sig)
        else:
            hostos.kill_group(pgid, sig)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self._signal_group(self.process.pid, signum)

    async def write_stdin(self, data: bytes) -> None:
        stream: trio.abc.SendStream | None = self.master
        if stream is None and self.process is not None:
            stream = self.process.stdin
        if stream is not None:
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def close_stdin(self) -> None:
        if self.master is not None:
            # A terminal has no end of input; ^D at the start of a line is the user's.
            await self.write_stdin(b"\x04")
        elif self.process is not None and self.process.stdin is not None:
            await self.process.stdin.aclose()

    async def kill(self) -> None:
        """Stop everything at once (connection lost, session ending)."""
        if self.process is None:
            return
        pid = self.process.pid
        for sig in (hostos.SIGTERM, hostos.SIGKILL):
            if self.process.returncode is not None and not hostos.group_alive(pid):
                return
            self._signal_group(pid, sig)
            with trio.move_on_after(STRAGGLER_GRACE):
                await self.process.wait()
                while hostos.group_alive(pid):
                    await trio.sleep(0.05)


def set_window_size(fd: int, rows: int, cols: int) -> None:
    if sys.platform != "win32":
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _discard(fd: int, data: bytes) -> None:
    """An output sink for a job whose client is gone."""
