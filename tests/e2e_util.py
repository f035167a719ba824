"""Helpers for the end-to-end tests: run the real `topyaz-mount exec` CLI as a subprocess.

`start_exec(...)` starts `python -m topyaz_mount.cli exec --remote ... -F ...
--remote-python ... --root ROOT -- COMMAND...` (the same entry point as the
`topyaz-mount` script, from this checkout) and returns an `ExecProcess` whose stdout and
stderr are collected by reader threads, so a test can wait for a line, send signals and
still get everything at the end. `run_exec(...)` is start + wait with a timeout and
returns a `subprocess.CompletedProcess` with bytes stdout/stderr.

Every process started here is ended by its pid in `ExecProcess.close()`, including the
`ssh` child of a topyaz-mount process that was killed (found by its parent pid while
the parent still lived).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from topyaz_mount.client.osapi import PORTABLE_ENV

REPO_DIR = Path(__file__).resolve().parent.parent
STANDINS_DIR = REPO_DIR / "tools" / "standins"
REMOTE_USER = os.environ.get("TOPYAZ_MOUNT_TESTHOST_USER", "tmremote")  # see tools/testhost.py
TEMP_MARK = ".tmcommit-"

CLI = [sys.executable, "-m", "topyaz_mount.cli"]


def client_env() -> dict[str, str]:
    """Our environment without TOPYAZ_MOUNT_* settings (but the choice of OS calls, and
    no persisted sessions), with this checkout importable."""
    keep = {PORTABLE_ENV}  # a test run with the portable OS calls (conftest.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPYAZ_MOUNT_") or k in keep}
    env["PYTHONPATH"] = str(REPO_DIR) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.pop("PYTHONSTARTUP", None)
    # One-shot execs end with their command, as each test expects; the tests of
    # sessions an exec leaves behind (test_persist_e2e.py) ask for them.
    env["TOPYAZ_MOUNT_PERSIST"] = "0"
    return env


def exec_argv(testhost, root: Path | str | None, command, *, options=(), remote=None,
              remote_python=None, dashdash: bool = True) -> list[str]:
    argv = [*CLI, "exec", "--remote", remote or testhost.remote,
            "-F", str(testhost.ssh_config),
            "--remote-python", remote_python or testhost.remote_python]
    if root is not None:
        argv += ["--root", str(root)]
    argv += [str(o) for o in options]
    if dashdash:
        argv.append("--")
    argv += [str(a) for a in command]
    return argv


# --------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[int, int, str, str] | None:
    """(ppid, pgrp, state, comm) of pid, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0], comm


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    st = proc_stat(pid)
    return st is not None and st[2] != "Z"


def children(pid: int) -> list[int]:
    out = []
    for p in all_pids():
        st = proc_stat(p)
        if st is not None and st[0] == pid:
            out.append(p)
    return out


def descendants(pid: int) -> set[int]:
    table = {}
    for p in all_pids():
        st = proc_stat(p)
        if st is not None:
            table[p] = st[0]
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        nxt = {p for p, pp in table.items() if pp in frontier and p not in found}
        found |= nxt
        frontier = nxt
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid."""
    out = []
    for p in all_pids():
        st = proc_stat(p)
        if st is not None and st[1] == pgid and st[2] != "Z":
            out.append(p)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _kill_by_pid(pid: int, comm: str, sig: int = signal.SIGKILL) -> None:
    """Kill pid if it is still the process we think it is (guards pid reuse)."""
    st = proc_stat(pid)
    if st is None or st[2] == "Z" or st[3] != comm:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class ExecProcess:
    """A running `topyaz-mount exec` with its output collected in the background."""

    def __init__(self, argv: list[str], *, cwd: Path | str, stdin_data: bytes | None = None,
                 env: dict[str, str] | None = None):
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            cwd=str(cwd),
            env=env if env is not None else client_env(),
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._out = bytearray()
        self._err = bytearray()
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        if stdin_data is not None:
            self._threads.append(
                threading.Thread(target=self._feed, args=(stdin_data,), daemon=True)
            )
        for t in self._threads:
            t.start()
        # ssh children seen so far (pid -> comm), for cleanup after a SIGKILL
        self.ssh_children: dict[int, str] = {}

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            data = stream.read1(1 << 16)
            if not data:
                break
            with self._cond:
                buf += data
                self._cond.notify_all()
        stream.close()

    def _feed(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    @property
    def stdout(self) -> bytes:
        with self._cond:
            return bytes(self._out)

    @property
    def stderr(self) -> bytes:
        with self._cond:
            return bytes(self._err)

    def wait_for_stdout(self, needle: bytes, timeout: float) -> bool:
        """Wait until stdout contains needle (False on timeout or if the process ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self._out:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[0].is_alive()):
                    return needle in self._out
                self._cond.wait(min(left, 0.1))
            return True

    def wait_for_stderr(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self._err:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[1].is_alive()):
                    return needle in self._err
                self._cond.wait(min(left, 0.1))
            return True

    def remember_ssh(self) -> dict[int, str]:
        """Record the ssh child (by parent pid) while this process is alive."""
        for child in children(self.pid):
            st = proc_stat(child)
            if st is not None and st[3] == "ssh":
                self.ssh_children[child] = st[3]
        return self.ssh_children

    def send_signal(self, sig: int) -> None:
        self.remember_ssh()
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the end; on timeout, kill everything and raise AssertionError."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self.stdout, self.stderr
            self.close()
            raise AssertionError(
                f"topyaz-mount did not finish within {timeout} s: {self.argv}\n"
                f"stdout: {out[-2000:]!r}\nstderr: {err[-2000:]!r}"
            ) from None
        for t in self._threads:
            t.join(timeout=30)
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, self.stdout,
                                           self.stderr)

    def close(self) -> None:
        """End this process and any ssh child it left behind, by pid."""
        if self.proc.poll() is None:
            self.remember_ssh()
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for pid, comm in list(self.ssh_children.items()):
            if pid_alive(pid):
                _kill_by_pid(pid, comm, signal.SIGTERM)
                if not wait_until(lambda p=pid: not pid_alive(p), 5):
                    _kill_by_pid(pid, comm, signal.SIGKILL)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> ExecProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_exec(testhost, root, *command, cwd=None, options=(), remote=None, remote_python=None,
               dashdash: bool = True, stdin_data: bytes | None = None) -> ExecProcess:
    argv = exec_argv(testhost, root, command, options=options, remote=remote,
                     remote_python=remote_python, dashdash=dashdash)
    return ExecProcess(argv, cwd=cwd if cwd is not None else root, stdin_data=stdin_data)


def run_exec(testhost, root, *command, cwd=None, timeout: float = 60, options=(), remote=None,
             remote_python=None, dashdash: bool = True,
             stdin_data: bytes | None = None) -> subprocess.CompletedProcess:
    """Run `topyaz-mount exec` to the end; returns CompletedProcess (bytes stdout/stderr)."""
    with start_exec(testhost, root, *command, cwd=cwd, options=options, remote=remote,
                    remote_python=remote_python, dashdash=dashdash,
                    stdin_data=stdin_data) as p:
        return p.wait(timeout)


def describe(r: subprocess.CompletedProcess) -> str:
    return (f"exit {r.returncode}\nstdout: {r.stdout[-3000:]!r}\n"
            f"stderr: {r.stderr[-3000:].decode(errors='replace')}")


# --------------------------------------------------------------------------- remote state


_ACL_XATTR = "system.posix_acl_access"
_ACL_USER, _ACL_MASK = 0x02, 0x10
_ACL_UNDEFINED = 0xFFFFFFFF


@contextlib.contextmanager
def _fuse_acl_entries():
    """/dev/fuse's ACL as (tag, perm, id) entries, edited in place and written back,
    under a lock: each pytest worker adds and removes an entry of its own user."""
    import fcntl

    with open("/tmp/topyaz-mount-tests-dev-fuse-acl.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            blob = os.getxattr("/dev/fuse", _ACL_XATTR)
            entries = [struct.unpack_from("<HHI", blob, i) for i in range(4, len(blob), 8)]
        except OSError:  # none yet: the one the mode bits stand for
            mode = os.stat("/dev/fuse").st_mode
            entries = [(0x01, (mode >> 6) & 7, _ACL_UNDEFINED), (0x04, (mode >> 3) & 7,
                       _ACL_UNDEFINED), (0x20, mode & 7, _ACL_UNDEFINED)]
        entries = [list(e) for e in entries]
        yield entries
        if not any(e[0] == _ACL_USER or e[0] == 0x08 for e in entries):
            with contextlib.suppress(OSError):
                os.removexattr("/dev/fuse", _ACL_XATTR)
            return
        if not any(e[0] == _ACL_MASK for e in entries):
            group = next(e[1] for e in entries if e[0] == 0x04)
            entries.append([_ACL_MASK, group, _ACL_UNDEFINED])
        entries.sort(key=lambda e: (e[0], e[2]))
        blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
        os.setxattr("/dev/fuse", _ACL_XATTR, blob)


@contextlib.contextmanager
def fuse_denied_to_remote_user():
    """/dev/fuse unusable for the test host's user alone: a POSIX ACL entry with no
    permissions for that user, so tests running beside this one keep their FUSE
    (``chmod 0600 /dev/fuse`` would take it from every user of the machine)."""
    uid = pwd.getpwnam(REMOTE_USER).pw_uid
    with _fuse_acl_entries() as entries:
        entries.append([_ACL_USER, 0, uid])
    try:
        yield
    finally:
        with _fuse_acl_entries() as entries:
            entries[:] = [e for e in entries if not (e[0] == _ACL_USER and e[2] == uid)]


def remote_home() -> Path:
    return Path(pwd.getpwnam(REMOTE_USER).pw_dir)


def sessions_dir() -> Path:
    return remote_home() / ".cache" / "topyaz-mount" / "sessions"


def session_dirs() -> set[str]:
    try:
        return {str(p) for p in sessions_dir().iterdir()}
    except FileNotFoundError:
        return set()


def session_agent_pid(session: Path | str) -> int | None:
    try:
        return int((Path(session) / "agent.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def temp_files(root: Path) -> list[Path]:
    """Commit temporaries (names containing .tmcommit-) anywhere below root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if TEMP_MARK in name:
                found.append(Path(dirpath) / name)
    return found


def unmount_lazy(path: str) -> None:
    r = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", path], capture_output=True)


def write_random(path: Path, size: int) -> str:
    """Write size random bytes; returns their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            block = os.urandom(min(4 << 20, left))
            fh.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def no_fusermount_python(testhost, tmp_path: Path) -> str:
    """A remote Python whose PATH has everything but fusermount3: FUSE is not usable
    (for this agent only; the machine's /dev/fuse stays as it is for other tests)."""
    bin_dir = tmp_path / "bin-without-fusermount"
    bin_dir.mkdir(parents=True)
    for top in ("/usr/bin", "/bin"):
        for name in os.listdir(top):
            if name != "fusermount3" and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(os.path.join(top, name))
    swap = f"s#^/usr/bin$#{bin_dir}#; s#^/bin$#{bin_dir}#"
    return wrapped_python(
        testhost, tmp_path / "python-without-fuse",
        f"PATH=$(printf %s \"$PATH\" | tr : '\\n' | sed {shlex.quote(swap)} | paste -sd:)",
    )


def portable_agent_python(testhost, tmp_path: Path) -> str:
    """A remote Python whose agent moves its ssh channel by threads, as on Windows
    (TOPYAZ_MOUNT_PORTABLE=1; agent/hostos.py)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return wrapped_python(testhost, tmp_path / "python-portable", f"export {PORTABLE_ENV}=1")


def wrapped_python(testhost, wrapper: Path, preamble: str) -> str:
    """The test host's Python behind a shell script that runs ``preamble`` first; the
    script and the directories above it are made reachable for the remote user."""
    wrapper.write_text(
        f"#!/bin/sh\n{preamble}\nexec {shlex.quote(testhost.remote_python)} \"$@\"\n"
    )
    wrapper.chmod(0o755)
    for p in wrapper.parents:
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o005)
    return str(wrapper)
