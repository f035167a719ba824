"""What a Windows host needs of the stage backend's agent, in one place.

Windows hosts (OpenSSH server, ``cmd.exe`` as its shell) run Photo AI and Gigapixel.
No Windows host was run here: the pure parts below (command lines, the names Windows
cannot hold, how the client's signals map) are unit-tested with Windows paths on
Linux, and the calls into Windows (``CTRL_BREAK_EVENT``, job objects) type-check with
``mypy --platform win32`` only.

- The argv travels as data and becomes one command line with
  ``subprocess.list2cmdline`` (the quoting the C runtime undoes); no shell sees it.
- Names Windows cannot hold are refused in one line before anything runs: staging
  ``CON.txt`` or ``a:b`` would fail halfway, or (case-only clashes) overwrite an input
  with another.
- Signals: a job runs in a process group of its own (``CREATE_NEW_PROCESS_GROUP``)
  and in a job object. An interrupt or a polite stop is ``CTRL_BREAK_EVENT`` to the
  group; a kill is ``TerminateJobObject`` (``taskkill /T /F`` where the job object
  could not be made), which ends the job's helpers too.
"""

from __future__ import annotations

import ntpath
import signal
import subprocess
import sys
from collections.abc import Iterable

MAX_PATH = 260  # characters, with the terminating NUL, without the \\?\ prefix
RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
    + ["COM¹", "COM²", "COM³", "LPT¹", "LPT²", "LPT³", "CONIN$", "CONOUT$"]
)
FORBIDDEN = frozenset('<>:"|?*')

# What the client's signals become: a break to the group, or the end of the job object.
BREAK = "break"
TERMINATE = "terminate"


def command_line(argv: list[str]) -> str:
    """The one command line ``CreateProcess`` gets for ``argv`` (no shell)."""
    if not argv:
        raise ValueError("empty command")
    return subprocess.list2cmdline(argv)


def session_tree(local_appdata: str, session_id: str) -> str:
    """Where a session's tree lives: ``%LOCALAPPDATA%\\topyaz-mount\\sessions\\<id>\\root``."""
    from .hostdirs import cache_dir, session_root

    base = cache_dir("win32", {"LOCALAPPDATA": local_appdata}, "")
    return session_root(base, session_id, "win32")


def name_problem(name: str) -> str | None:
    """Why Windows cannot hold a file or directory called ``name``, or None."""
    if not name or name in (".", ".."):
        return "an empty or dot name"
    bad = sorted({c for c in name if c in FORBIDDEN or ord(c) < 32})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return f"a character Windows does not allow in names ({shown})"
    if name[-1] in ". ":
        return "a trailing dot or space (Windows drops it)"
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    if stem in RESERVED:
        return f"a device name Windows reserves ({stem})"
    return None


def path_problem(rel_paths: Iterable[str], tree: str) -> str | None:
    """Why the staged tree at ``tree`` cannot hold these paths (``/``-separated, under
    the tree) on Windows, as one line naming the first offender; or None.

    Checks every component's name, names that differ only in case within one
    directory (Windows folds case: one would overwrite the other), and full paths
    over ``MAX_PATH`` unless ``tree`` has the ``\\\\?\\`` prefix."""
    long_ok = tree.startswith("\\\\?\\")
    folded: dict[tuple[str, str], str] = {}
    for rel in rel_paths:
        parts = [p for p in rel.split("/") if p]
        for i, part in enumerate(parts):
            why = name_problem(part)
            if why:
                return f"{rel}: Windows cannot hold this name: {why}"
            parent = "/".join(parts[:i]).casefold()
            key = (parent, part.casefold())
            other = folded.setdefault(key, "/".join(parts[: i + 1]))
            if other != "/".join(parts[: i + 1]):
                return f"{rel}: differs from {other} only in case (one to Windows)"
        full = ntpath.join(tree, *parts)
        if not long_ok and len(full) + 1 > MAX_PATH:
            return f"{rel}: {len(full)} characters on the host, over Windows' {MAX_PATH - 1}"
    return None


def action_for(signum: int) -> str:
    """What a client's signal becomes for a Windows job: ``BREAK`` or ``TERMINATE``.

    Windows has no signals between processes; ``CTRL_C_EVENT`` cannot reach a group of
    its own. So everything the job may catch (interrupt, hangup, terminate, quit) is a
    break, and a kill ends the job object."""
    kill = getattr(signal, "SIGKILL", 9)
    return TERMINATE if signum == kill else BREAK


def creation_flags() -> int:
    """``Popen(creationflags=...)`` for a job: a process group of its own."""
    if sys.platform == "win32":
        return subprocess.CREATE_NEW_PROCESS_GROUP
    return 0


class JobObject:
    """A Windows job object holding a job's processes, so a kill ends them all."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.handle: int | None = None
        if sys.platform == "win32":
            self.handle = _assign_job_object(pid)

    def signal(self, signum: int) -> None:
        """Deliver the client's ``signum`` to the job's processes."""
        if sys.platform != "win32":
            raise OSError("Windows job control on a host that is not Windows")
        import os

        if action_for(signum) == BREAK:
            try:
                os.kill(self.pid, signal.CTRL_BREAK_EVENT)
                return
            except OSError:
                pass  # the group leader is gone: end what is left
        if self.handle is not None and _terminate_job_object(self.handle):
            return
        subprocess.run(
            ["taskkill", "/T", "/F", "/PID", str(self.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    _PROCESS_SET_QUOTA = 0x0100
    _PROCESS_TERMINATE = 0x0001

    def _assign_job_object(pid: int) -> int | None:
        kernel32 = ctypes.windll.kernel32
        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            return None
        process = kernel32.OpenProcess(
            wintypes.DWORD(_PROCESS_SET_QUOTA | _PROCESS_TERMINATE), False, wintypes.DWORD(pid)
        )
        if not process:
            kernel32.CloseHandle(job)
            return None
        try:
            if not kernel32.AssignProcessToJobObject(job, process):
                kernel32.CloseHandle(job)
                return None
        finally:
            kernel32.CloseHandle(process)
        return int(job)

    def _terminate_job_object(handle: int) -> bool:
        return bool(ctypes.windll.kernel32.TerminateJobObject(handle, 1))

else:

    def _assign_job_object(pid: int) -> int | None:
        return None

    def _terminate_job_object(handle: int) -> bool:
        return False
