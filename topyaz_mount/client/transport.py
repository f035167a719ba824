"""The system ``ssh`` client as our transport: one process, its pipes are the channel.

Using OpenSSH itself keeps the user's ~/.ssh/config, agent, ProxyJump and
ControlMaster working, as sshfs, rsync and mutagen do. The ssh process gets its own
process group, so a Ctrl-C typed at the terminal reaches topyaz-mount (which forwards
it to the remote job) instead of killing the connection the outputs still travel on.

Starting ssh (``spawn_ssh``) needs no trio, and this module imports trio only where it
waits: the command line spawns ssh first and imports the rest of the client while the
connection is being made, which takes a third off a one-shot exec's start-up.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AgentUnavailable, AuthenticationFailed, ConnectionFailed, UsageError
from ..wire import liveness
from .ciphers import cipher_options
from .osapi import OS

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

_REMOTE = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s\[\]]+)(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class Remote:
    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Remote:
        """``[user@]host[:port]``; IPv6 literals in brackets (``[::1]:2222``)."""
        text = text.strip()
        m = _REMOTE.match(text)
        if not m or text.startswith("-"):
            raise UsageError(f"--remote {text!r}: expected [user@]host[:port]")
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 0 < port < 65536:
            raise UsageError(f"--remote {text!r}: port out of range")
        return cls(m["host"].strip("[]"), m["user"], port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"{self.user + '@' if self.user else ''}{host}{port}"


@dataclass(frozen=True)
class SshSettings:
    remote: Remote
    options: tuple[str, ...] = ()  # values for ``-o``
    config_file: str | None = None
    remote_python: str = "python3"
    agent_args: tuple[str, ...] = ()
    ssh_program: str = "ssh"
    agent_log_level: str = "WARNING"
    keepalive: liveness.Timing = field(default_factory=liveness.from_env)
    # Seconds the remote session outlives a lost connection, for the client to come
    # back (reconnect.py); 0: the session ends with its connection.
    grace: float = 0.0
    # --bwlimit: bytes a second (we send, the agent sends); 0 is no limit (pacing.py).
    bwlimit: tuple[int, int] = (0, 0)
    # The remote login shell: "sh", or "cmd" (Windows' OpenSSH server; config.SHELLS).
    remote_shell: str = "sh"

    def argv(self) -> list[str]:
        return self.argv_for(self.remote_command())

    def argv_for(self, command: str) -> list[str]:
        """ssh running ``command`` (a shell command line) on the remote instead."""
        argv = [self.ssh_program, "-T", "-x"]
        if self.config_file:
            argv += ["-F", self.config_file]
        if self.remote.port:
            argv += ["-p", str(self.remote.port)]
        for opt in self.options:
            argv += ["-o", opt]
        # ssh takes the first value it sees for an option, so the user's come first
        # and these only fill in what the user left unset.
        for opt in self.keepalive.ssh_options():
            argv += ["-o", opt]
        for opt in cipher_options(self.config_file, self.options):
            argv += ["-o", opt]
        argv += ["--", self.remote.destination, command]
        return argv

    def remote_command(self) -> str:
        from .. import __version__

        words = [self.remote_python, "-m", "topyaz_mount.agent", "--client-version", __version__]
        words += ["--log-level", self.agent_log_level, *self.agent_args]
        if self.keepalive != liveness.Timing():
            words += ["--keepalive", str(self.keepalive)]
        if self.grace > 0 and "--attach" not in self.agent_args:
            words += ["--grace", f"{self.grace:g}"]
        return shell_line(words, self.remote_shell)


def shell_line(words: list[str], shell: str = "sh") -> str:
    """``words`` as one command line for the remote login shell: POSIX quoting and
    ``exec`` for sh; for cmd.exe, the quoting the Windows C runtime parses back into
    the same argv (``subprocess.list2cmdline``), and none of cmd's own metacharacters
    where cmd would act on them (refused): ``&|<>^`` outside quotes, ``%`` anywhere."""
    if shell != "cmd":
        return "exec " + " ".join(shlex.quote(w) for w in words)
    line = subprocess.list2cmdline(words)
    unquoted = "".join(part for i, part in enumerate(line.split('"')) if i % 2 == 0)
    if any(c in unquoted for c in "&|<>^") or "%" in line:
        raise UsageError(f"cannot pass {line!r} to cmd.exe: it holds &, |, <, >, ^ or %")
    return line


@dataclass
class SshProcess:
    """A running ssh: its pipes as trio streams, and a wait that does not block."""

    popen: subprocess.Popen
    stream: trio.abc.Stream
    stderr: trio.abc.ReceiveStream
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    async def wait(self) -> int:
        import trio

        if self.popen.poll() is None:
            pidfd = OS.process_fd(self.popen.pid)
            if pidfd is None:  # no pidfd (old kernel, not Linux): poll
                while self.popen.poll() is None:
                    await trio.sleep(0.02)
            else:
                try:
                    await trio.lowlevel.wait_readable(pidfd)
                finally:
                    os.close(pidfd)
        return self.popen.wait()

    async def pump_stderr(self) -> None:
        """Log what ssh and the agent say on stderr; keep the tail for error messages."""
        import trio

        buf = b""
        async with self.stderr:
            while True:
                try:
                    data = await self.stderr.receive_some(1 << 14)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._line(line)
        if buf:
            self._line(buf)

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        if text:
            self.stderr_tail.append(text)
            log.info("remote: %s", text)

    async def stop(self, grace: float = 5.0) -> None:
        """Close our end of the channel, then wait for ssh; kill it if it lingers.
        ``grace`` 0: do not wait (see ``Session.exit_after``)."""
        import trio

        try:
            await self.stream.send_eof()  # type: ignore[attr-defined]
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        if grace == 0:
            return
        with trio.move_on_after(grace):
            await self.wait()
        if self.returncode is None:
            self.kill()
            await self.wait()


def spawn_ssh(settings: SshSettings) -> subprocess.Popen:
    """Start ssh with the agent as its remote command (no trio needed yet)."""
    argv = settings.argv()
    log.debug("starting %s", shlex.join(argv))
    group: dict = (
        {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    )
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **group,
        )
    except FileNotFoundError:
        raise ConnectionFailed(
            f"the ssh client {settings.ssh_program!r} is not installed"
        ) from None
    assert popen.stdin is not None and popen.stdout is not None
    for pipe in (popen.stdin, popen.stdout):
        OS.widen_pipe(pipe.fileno(), 1 << 20)
    return popen


def attach_ssh(popen: subprocess.Popen) -> SshProcess:
    """Hand a spawned ssh's pipes to trio (the fds move into trio streams)."""
    import trio

    def take(f) -> int:  # the fd, no longer owned by the Python file object
        fd = os.dup(f.fileno())
        f.close()
        return fd

    assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
    stdin = trio.lowlevel.FdStream(take(popen.stdin))
    stdout = trio.lowlevel.FdStream(take(popen.stdout))
    stderr = trio.lowlevel.FdStream(take(popen.stderr))
    # StapledStream.send_eof closes ssh's stdin: ssh passes the EOF on to the agent.
    return SshProcess(popen, trio.StapledStream(stdin, stdout), stderr)


async def start_ssh(settings: SshSettings) -> SshProcess:
    return attach_ssh(spawn_ssh(settings))


def explain_startup_failure(settings: SshSettings, tail: list[str]) -> Exception:
    """Turn what ssh / the remote shell printed into one clear error."""
    from .. import __version__

    host = str(settings.remote)
    text = "\n".join(tail)
    last = next((line for line in reversed(tail) if line.strip()), "no message")
    py = settings.remote_python
    if "Permission denied" in text or "Too many authentication failures" in text:
        return AuthenticationFailed(f"cannot log in to {host}: {last}")
    setup = f"run `topyaz-mount setup --remote {host}`"
    skew = re.search(r"topyaz-mount version skew: agent (\S+), client (\S+)", text)
    if skew:
        return AgentUnavailable(
            f"topyaz-mount on {host} is {skew[1]}, this client is {skew[2]}: {setup} "
            f"to install {skew[2]} there"
        )
    if "unrecognized arguments: --client-version" in text:
        return AgentUnavailable(
            f"topyaz-mount on {host} ({py}) is older than this client ({__version__}): {setup}"
        )
    missing = re.search(r"No module named '?([\w.]+)'?", text)
    if missing:
        module = missing.group(1).split(".")[0]
        if module == "topyaz_mount":
            return AgentUnavailable(
                f"topyaz-mount is not installed on {host} for {py}: {setup}, "
                f"or pass --remote-python"
            )
        return AgentUnavailable(f"{py} on {host} lacks the Python package {module!r}: {setup}")
    shell_says = (
        rf"{re.escape(py)}: (command )?not found|command not found: {re.escape(py)}"
        rf"|{re.escape(py)}: No such file or directory|exec: {re.escape(py)}: not found"
    )
    if re.search(shell_says, text):
        return AgentUnavailable(
            f"no Python interpreter {py!r} on {host}: {setup}, or pass --remote-python"
        )
    patterns = (
        "Could not resolve hostname",
        "Connection refused",
        "Connection timed out",
        "No route to host",
        "Network is unreachable",
        "Connection closed",
        "Connection reset",
        "kex_exchange_identification",
        "Host key verification failed",
    )
    if any(p in text for p in patterns):
        return ConnectionFailed(f"cannot connect to {host}: {last}")
    return AgentUnavailable(f"the topyaz-mount agent on {host} did not start: {last}")


def run_remote_json(
    settings: SshSettings, timeout: float = 120, command: str | None = None, stdin: bytes = b""
) -> dict:
    """Run something one-shot that prints one JSON object last: the agent in one of its
    modes (``cache``, ``doctor``), or ``command`` (``setup``'s snippets) fed ``stdin``."""
    import json

    argv = settings.argv() if command is None else settings.argv_for(command)
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise ConnectionFailed(
            f"the ssh client {settings.ssh_program!r} is not installed"
        ) from None
    except subprocess.TimeoutExpired:
        raise ConnectionFailed(f"no answer from {settings.remote} in {timeout:.0f} s") from None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            answer = json.loads(lines[-1])
            if isinstance(answer, dict):
                return answer
        except ValueError:
            pass
    tail = done.stderr.decode(errors="replace").splitlines()[-40:]
    raise explain_startup_failure(settings, tail)
