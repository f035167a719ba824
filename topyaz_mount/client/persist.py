"""A connection paid once: one-shot ``exec`` through a session that is already up.

Like ssh's ControlMaster/ControlPersist. Every session (a ``mount``, or one an ``exec``
left behind with ``--persist``) writes beside its control socket a ``<name>.key``
holding its *reuse key*: a digest of everything that makes two sessions differ for the
job (the host, the ssh command and its options, the remote Python, the backend and
cache cap, ``--grace``, ``--bwlimit``, the root, the write policy). A one-shot exec
computes the same digest; a live session with an equal key runs the command instead
of a new connection. Everything else (environment, working directory, ``--include``,
stdin, the products' programs) travels with each command, so it never prevents reuse.

An exec that found none forks, before trio is imported, a session process of its own
(``start``): it connects, runs the command as its first, and stays up ``persist``
seconds after its last command, as a normal session (``status`` shows it,
``unmount`` ends it). The exec itself is then a client of that session, as the next
ones will be. A lock keeps two execs started at once from making two.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import astuple, replace
from pathlib import Path

from blake3 import blake3

from ..policy import PolicyOptions
from . import runtime
from .transport import SshSettings


def reuse_key(settings: SshSettings, root: str, policy: PolicyOptions) -> str:
    """The digest two sessions share exactly when one can run the other's commands."""
    quiet = replace(settings, agent_log_level="WARNING")  # -v does not change the job
    what = [quiet.argv(), settings.bwlimit, root, astuple(policy)]
    # blake3, not hashlib: this runs before ssh starts, and hashlib's OpenSSL is 3 ms
    return blake3(json.dumps(what).encode()).hexdigest()[:32]


def key_path(name: str) -> Path:
    return runtime.runtime_dir() / f"{runtime.check_name(name)}.key"


def write_key(name: str, key: str) -> None:
    """Publish the session's reuse key (removed by ``forget`` when it ends)."""
    path = key_path(name)
    tmp = path.with_suffix(".key.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    os.replace(tmp, path)


def forget(name: str) -> None:
    with contextlib.suppress(OSError):
        key_path(name).unlink()


def find(key: str) -> str | None:
    """A session whose reuse key is ``key`` and whose socket is there, else None."""
    directory = runtime.runtime_dir(create=False)
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("*.key")):
        try:
            if path.read_text() != key:
                continue
        except OSError:
            continue
        name = path.name[: -len(".key")]
        if (directory / f"{name}.sock").exists():
            return name
    return None


def session_name(root: str, key: str) -> str:
    """``<root's name>-<key's first 8>``: readable in ``status``, one per key."""
    return f"{runtime.default_name(Path(root))[:40]}-{key[:8]}"


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Held while an exec looks for, or starts, a session: two execs started at once
    make one session between them. The lock is the runtime dir's own (no file left)."""
    fd = os.open(runtime.runtime_dir(), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start(name: str, serve: Callable[[int], None]) -> dict:
    """Fork the session process, which runs ``serve(ready_fd)`` and never returns here;
    its first line on that fd: ``{"listening": true}`` once its control socket takes
    commands (before the agent is up: the first command goes out behind the Hello), or
    its failure. What it writes later (``{"ok": true, ...}``) nobody reads."""
    r, w = os.pipe()
    log_path = runtime.runtime_dir() / f"{name}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the session: a process group of its own, its words to the log
        code = 255
        try:
            os.closerange(3, w)  # the caller's pipes and locks are not ours to hold
            os.closerange(w + 1, 1 << 16)
            os.setsid()
            _detach_stdio(log_path)
            serve(w)
            code = 0
            log_path.unlink(missing_ok=True)  # it ended cleanly: nothing to read there
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 255
        except BaseException:  # noqa: BLE001 - ends as the status below, the log has it
            pass
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        data = ready.readline()
    info = json.loads(data) if data.strip() else {}
    if info.get("listening"):
        return {"ok": True}
    os.waitpid(pid, 0)
    log_path.unlink(missing_ok=True)  # the caller says why it failed
    if info:
        return dict(info)
    return {"ok": False, "error": f"the session {name} did not start", "code": 255}


def _detach_stdio(log_path: Path) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
