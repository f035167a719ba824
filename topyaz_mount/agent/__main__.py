"""Entry point on the remote host: ``python -m topyaz_mount.agent``.

The ssh channel is this process's stdin and stdout. stdout is moved out of reach
first (fd 1 then points at stderr), so a stray print can never corrupt the framing;
everything human-readable goes to stderr, which the client logs.
"""

from __future__ import annotations

import gc

# No collection while the modules load (10 ms of the agent's start): nothing they make
# is garbage. Enabled again before the session serves (``_serving``).
gc.disable()

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

import trio

from ..pipes import widen
from ..wire import liveness, proto
from . import hostdirs, hostos, kept, relay
from .backend import CHOICES
from .session import AgentSession
from .store import ContentStore


def default_base_dir() -> Path:
    return Path(hostdirs.cache_dir())


async def _serve(session: AgentSession, channel_in: int, channel_out: int) -> None:
    stream = hostos.channel(channel_in, channel_out)
    await stream.send_all(proto.MAGIC)
    await session.serve(stream)


def _cache_command(base_dir: Path, cap: int | None, clear: bool, prune_to: int | None) -> int:
    """``topyaz-mount cache``'s remote half: one JSON object on stdout."""
    store = ContentStore(base_dir, cap)
    freed = 0
    if clear:
        freed = store.clear()
    elif prune_to is not None:
        freed = store.enforce_cap(prune_to)
    out = store.stats().as_dict()
    out["freed"] = freed
    out["path"] = str(store.root)  # type: ignore[assignment]
    print(json.dumps(out))
    return 0


def _kept_command(base_dir: Path, clear: bool, session: str | None) -> int:
    """``topyaz-mount kept``'s remote half (list or clear): one JSON object on stdout."""
    freed = kept.remove(base_dir, session) if clear else 0
    sessions = [k.as_dict() for k in kept.list_all(base_dir)]
    print(json.dumps({"path": str(kept.kept_root(base_dir)), "sessions": sessions, "freed": freed}))
    return 0


# The line the client reads back (transport.explain_startup_failure) on version skew.
SKEW_MARK = "topyaz-mount version skew:"


def _doctor(base_dir: Path, client_version: str | None, backend: str) -> int:
    """``topyaz-mount doctor``'s remote half: each check, ok or what is wrong.

    FUSE (and pyfuse3) fail the check only where ``backend`` insists on FUSE: ``auto``
    stages the files on a host without it, and says so."""
    import importlib
    import shutil
    import sys as _sys

    from .. import __version__
    from .backend import fuse_unusable_reason as fuse_problem

    checks: list[dict[str, object]] = [
        {"check": "python", "ok": _sys.version_info >= (3, 10), "detail": _sys.version.split()[0]},
        {
            "check": "topyaz-mount",
            "ok": client_version in (None, __version__),
            "detail": __version__
            + (f" (the client is {client_version})" if client_version else ""),
        },
    ]
    for module in ("pyfuse3", "trio", "msgspec", "blake3", "platformdirs"):
        try:
            mod = importlib.import_module(module)
            checks.append(
                {
                    "check": module,
                    "ok": True,
                    "detail": str(getattr(mod, "__version__", "installed")),
                }
            )
        except ImportError as e:
            needed = module != "pyfuse3" or backend == "fuse"
            checks.append({"check": module, "ok": not needed, "detail": f"missing ({e})"})
    problem = fuse_problem() if backend != "stage" else None
    if backend == "stage":
        checks.append({"check": "fuse", "ok": True, "detail": "not used (--backend stage)"})
    elif problem is None:
        checks.append({"check": "fuse", "ok": True, "detail": "usable"})
    else:
        detail = problem if backend == "fuse" else f"{problem}; auto stages files instead"
        checks.append({"check": "fuse", "ok": backend != "fuse", "detail": detail})
    used = "fuse" if backend == "fuse" or (backend == "auto" and problem is None) else "stage"
    checks.append({"check": "backend", "ok": True, "detail": f"{used} (asked for: {backend})"})
    try:
        base_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(base_dir).free
        checks.append(
            {
                "check": "cache dir",
                "ok": os.access(base_dir, os.W_OK),
                "detail": f"{base_dir} ({free >> 20} MiB free)",
            }
        )
    except OSError as e:
        checks.append({"check": "cache dir", "ok": False, "detail": f"{base_dir}: {e.strerror}"})
    print(json.dumps({"checks": checks}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topyaz_mount.agent")
    parser.add_argument("--base-dir", type=Path, default=None)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--cache-cap", type=int, default=None, help="bytes")
    parser.add_argument("--cache-stats", action="store_true", help="print cache JSON, exit")
    parser.add_argument("--clear", action="store_true", help="with --cache-stats or --kept")
    parser.add_argument("--kept", action="store_true", help="print kept outputs as JSON, exit")
    parser.add_argument("--session", default=None, help="with --kept --clear: only this one")
    parser.add_argument("--prune-to", type=int, default=None, help="with --cache-stats")
    parser.add_argument("--doctor", action="store_true", help="print checks as JSON, exit")
    parser.add_argument("--client-version", default=None, help="refuse to serve another")
    parser.add_argument(
        "--backend",
        choices=CHOICES,
        default="auto",
        help="how the job sees the root: a FUSE mount, a staged tree, or FUSE where it works",
    )
    parser.add_argument(
        "--keepalive",
        type=liveness.Timing.parse,
        default=liveness.Timing(),
        help="INTERVAL,DEAD_AFTER seconds (see liveness.py)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=None,
        help="seconds a session outlives a lost connection (a detachable session)",
    )
    parser.add_argument("--attach", default=None, help="re-attach to this detached session")
    parser.add_argument(
        "--detachable", action="store_true", help="print detachable sessions as JSON, exit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="agent[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    base_dir = args.base_dir or default_base_dir()
    if args.doctor:
        return _doctor(base_dir, args.client_version, args.backend)
    from .. import __version__

    if args.client_version not in (None, __version__):
        print(f"{SKEW_MARK} agent {__version__}, client {args.client_version}", file=sys.stderr)
        return 3
    if args.kept:
        return _kept_command(base_dir, args.clear, args.session)
    if args.detachable:
        print(json.dumps({"sessions": relay.list_hosts(base_dir / "sessions")}))
        return 0
    if args.cache_stats:
        return _cache_command(base_dir, args.cache_cap, args.clear, args.prune_to)
    channel_in = os.dup(0)
    channel_out = os.dup(1)
    widen(channel_in)
    widen(channel_out)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    if args.attach is not None or args.grace is not None:
        return _relay(base_dir, args, channel_in, channel_out)
    try:
        session = AgentSession(base_dir, args.cache_cap, args.keepalive, args.backend)
        _serving()
        trio.run(_serve, session, channel_in, channel_out)
    except KeyboardInterrupt:
        return 130
    return 0


def _serving() -> None:
    """Collect garbage from here on; what the start made is frozen (never scanned)."""
    gc.freeze()
    gc.enable()


def _preload_fuse() -> None:
    """What a FUSE session's Hello imports, loaded before the host is forked: with no
    collection running (above) it loads faster here, and a host without pyfuse3
    stages files (backend.py) and so needs none of it."""
    if sys.platform.startswith("linux"):
        try:
            import pyfuse3  # noqa: F401

            from . import fs, fuse_backend  # noqa: F401
        except ImportError:
            pass


def _relay(base_dir: Path, args: argparse.Namespace, channel_in: int, channel_out: int) -> int:
    """The ssh side of a detachable session (relay.py): start its host, or find it."""
    from ..wire import resume

    if args.attach is not None:
        sock = relay.connect_host(base_dir / "sessions", args.attach)
        if sock is None:
            os.write(channel_out, resume.REFUSED_PREFIX + b"no such session on this host\n")
            return 4
    else:
        if args.backend != "stage":
            _preload_fuse()
        sock = relay.start_host(
            lambda first: _host(base_dir, args, first), drop_fds=(channel_in, channel_out)
        )
    return relay.relay(channel_in, channel_out, sock)


def _host(base_dir: Path, args: argparse.Namespace, first: socket.socket) -> int:
    """A detached session host (host.py), forked from the relay; what it logs goes to
    hosts/PID.log, and nothing of it to ssh's stderr (sshd waits for that pipe's end)."""
    from .host import SessionHost

    logs = base_dir / "hosts"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = logs / f"{os.getpid()}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    os.dup2(log_fd, 1)
    os.close(log_fd)
    session = AgentSession(base_dir, args.cache_cap, args.keepalive, args.backend)
    host = SessionHost(session, args.keepalive, args.grace or 0.0)
    try:
        _serving()
        trio.run(host.serve, first)
    except KeyboardInterrupt:
        return 130
    log_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
