"""Helpers for tools/bench: timed runs, per-process CPU and memory, machine facts.

Nothing here knows about topyaz-mount's internals: a run is an argv (or two processes
joined by a socketpair, for the sshfs baseline), timed by the wall clock, with

* the exact CPU time and peak RSS of the local processes, from ``wait4`` (a child's
  rusage includes the descendants it waited for, e.g. topyaz-mount's ssh);
* a sampled view of every process below given roots (the test host's sshd and the
  local client), read from /proc every 50 ms: CPU time and VmHWM per process. A
  process's last 50 ms before it exits are not seen, so sampled CPU under-counts by
  at most that much per process.

Also: order statistics, machine and git facts, folding py-spy raw output.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- numbers


@dataclass
class Series:
    """Repeated measurements of one thing (seconds, or anything)."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


def time_hash_fd(python: Path, paths: list[Path]) -> float:
    """Seconds the snapshot's ``hash_fd`` takes over ``paths`` from the page cache (best
    of 3, in ``python``, the snapshot's interpreter); nan if it could not run."""
    code = (
        "import os,sys,time; from topyaz_mount.wire.hashing import hash_fd; b=[]\n"
        "for _ in range(3):\n t=time.perf_counter()\n for p in sys.argv[1:]:\n"
        "  fd=os.open(p,os.O_RDONLY); hash_fd(fd); os.close(fd)\n"
        " b.append(time.perf_counter()-t)\nprint(min(b))"
    )
    p = subprocess.run([str(python), "-c", code, *map(str, paths)], capture_output=True, text=True)
    try:
        return float(p.stdout.strip())
    except ValueError:
        return float("nan")


def mbps(nbytes: int, seconds: float) -> float:
    """Decimal megabytes per second."""
    return nbytes / 1e6 / seconds if seconds > 0 else float("inf")


# --------------------------------------------------------------------------- /proc


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[int, str, int, int, str] | None:
    """(ppid, comm, cpu_ticks, starttime, state) of a process, or None if gone."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    head, _, rest = raw.rpartition(b")")
    comm = head.partition(b"(")[2].decode(errors="replace")
    f = rest.split()
    # after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    #            utime(11) stime(12) cutime cstime priority nice threads itreal starttime(19)
    return int(f[1]), comm, int(f[11]) + int(f[12]), int(f[19]), f[0].decode()


def proc_mem_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, RssAnon) in KiB; zeros if unknown."""
    raw = _read(f"/proc/{pid}/status")
    if raw is None:
        return 0, 0
    hwm = re.search(rb"^VmHWM:\s+(\d+) kB", raw, re.M)
    anon = re.search(rb"^RssAnon:\s+(\d+) kB", raw, re.M)
    return (int(hwm.group(1)) if hwm else 0), (int(anon.group(1)) if anon else 0)


def system_busy_ticks() -> int:
    """CPU ticks all CPUs spent not idle (user, nice, system, irq, softirq, steal)."""
    raw = _read("/proc/stat") or b"cpu 0"
    f = [int(x) for x in raw.split(b"\n", 1)[0].split()[1:]]
    f += [0] * (8 - len(f))
    return f[0] + f[1] + f[2] + f[5] + f[6] + f[7]


def proc_argv(pid: int) -> list[bytes]:
    raw = _read(f"/proc/{pid}/cmdline") or b""
    return [a for a in raw.split(b"\0") if a]


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def descendants(roots: set[int]) -> set[int]:
    """Every live process below any of roots (roots excluded)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


# uids of the test host's remote user, when the bench knows it: processes of theirs
# count as the remote side even with no sshd of theirs alive at the moment.
REMOTE_UIDS: set[int] = set()


def remote_users(pids: set[int]) -> set[int]:
    """The uids (root excepted) that run any of ``pids``."""
    uids = set()
    for pid in pids:
        try:
            uids.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            pass
    uids.discard(0)
    return uids


def ours_detached() -> set[int]:
    """topyaz-mount processes that left the run's process tree (a persisted session's
    daemon double-forks away from the exec that started it): local too."""
    me = os.getpid()
    out = set()
    for pid in all_pids():
        if pid == me:
            continue
        argv = proc_argv(pid)
        if any(b"topyaz_mount" in a or a.endswith(b"topyaz-mount") for a in argv[:3]):
            out.add(pid)
    return out


def owned_by(uids: set[int]) -> set[int]:
    """Every live process of one of ``uids``."""
    if not uids:
        return set()
    out = set()
    for pid in all_pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid in uids:
                out.add(pid)
        except OSError:
            pass
    return out


@dataclass
class ProcInfo:
    pid: int
    comm: str
    argv: list[bytes]
    side: str  # "local" or "remote"
    cpu_ticks: int = 0
    hwm_kib: int = 0
    anon_kib: int = 0  # peak RssAnon seen (private memory, no file pages)
    base_ticks: int = 0  # a process already there when sampling began: its CPU before

    @property
    def cpu_s(self) -> float:
        return max(0, self.cpu_ticks - self.base_ticks) / CLK_TCK

    def is_agent(self) -> bool:
        return b"topyaz_mount.agent" in self.argv

    def is_sshfs(self) -> bool:
        return bool(self.argv) and os.path.basename(self.argv[0]) == b"sshfs"

    def label(self) -> str:
        if self.is_agent():
            return "agent (python)"
        if self.is_sshfs():
            return "sshfs"
        if self.comm.startswith("sshd"):
            return "sshd"
        if self.comm.startswith("python") or self.comm.startswith("topyaz"):
            return "client (python)"
        return self.comm


class ProcSampler(threading.Thread):
    """Samples CPU time and VmHWM of every process below the given roots.

    ``remote_root``'s descendants are the remote side (the test host's sshd is the
    root; it is not counted itself), and so is every process of the remote user: the
    agent's session host is forked away from sshd, and was counted as foreign load.
    ``local_roots`` and their descendants are local.
    """

    def __init__(
        self,
        remote_root: int,
        local_roots: list[int] = (),
        interval: float = 0.05,
        rescan_every: int = 2,
    ) -> None:
        super().__init__(daemon=True)
        self.remote_root = remote_root
        self.local_roots = list(local_roots)
        self.interval = interval
        self.rescan_every = rescan_every
        self.procs: dict[tuple[int, int], ProcInfo] = {}  # (pid, starttime) -> info
        self._live: dict[int, tuple[int, int]] = {}
        self._remote_uids: set[int] = set(REMOTE_UIDS)
        self._halt = threading.Event()

    def add_local_root(self, pid: int) -> None:
        self.local_roots.append(pid)

    def start(self) -> None:
        self._rescan(already_there=True)  # before the run is spawned
        super().start()

    def _rescan(self, already_there: bool = False) -> None:
        remote = descendants({self.remote_root})
        remote |= owned_by(remote_users(remote) | self._remote_uids)
        self._remote_uids |= remote_users(remote)
        local = set(self.local_roots) | descendants(set(self.local_roots))
        detached = ours_detached()
        local |= detached | descendants(detached)
        for side, pids in (("remote", remote), ("local", local)):
            for pid in pids:
                if pid in self._live:
                    continue
                st = proc_stat(pid)
                if st is None:
                    continue
                key = (pid, st[3])
                if key not in self.procs:
                    base = st[2] if already_there else 0
                    self.procs[key] = ProcInfo(pid, st[1], proc_argv(pid), side, base_ticks=base)
                self._live[pid] = key

    def _sample(self) -> None:
        for pid, key in list(self._live.items()):
            st = proc_stat(pid)
            if st is None or st[3] != key[1] or st[4] in "ZX":
                if st is not None and st[3] == key[1]:
                    self.procs[key].cpu_ticks = max(self.procs[key].cpu_ticks, st[2])
                del self._live[pid]
                continue
            info = self.procs[key]
            info.cpu_ticks = max(info.cpu_ticks, st[2])
            if info.comm != st[1]:  # exec'd since first seen
                info.comm = st[1]
                info.argv = proc_argv(pid)
            hwm, anon = proc_mem_kib(pid)
            info.hwm_kib = max(info.hwm_kib, hwm)
            info.anon_kib = max(info.anon_kib, anon)

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            if i % self.rescan_every == 0:
                self._rescan()
            self._sample()
            i += 1
            self._halt.wait(self.interval)
        self._rescan()
        self._sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def by_label(self, side: str | None = None) -> dict[str, tuple[float, int, int]]:
        """label -> (cpu seconds summed, largest VmHWM, largest RssAnon; KiB)."""
        out: dict[str, tuple[float, int, int]] = {}
        for info in self.procs.values():
            if side is not None and info.side != side:
                continue
            cpu, hwm, anon = out.get(info.label(), (0.0, 0, 0))
            out[info.label()] = (cpu + info.cpu_s, max(hwm, info.hwm_kib), max(anon, info.anon_kib))
        return out


# --------------------------------------------------------------------------- runs


class RunFailed(RuntimeError):
    pass


@dataclass
class RunResult:
    wall: float
    local_cpu: float  # exact (wait4): the local processes and what they waited for
    local_maxrss_kib: int
    sampled: dict[str, tuple[float, int, int]]  # label -> (cpu s, VmHWM, RssAnon KiB)
    remote_cpu: float  # sampled
    system_cpu: float  # every process on the machine (and the kernel), from /proc/stat
    stderr: str = ""
    stats: dict | None = None  # topyaz-mount --stats=json, when asked for
    helper_cpu: float = 0.0  # CPU of helper processes during the run (the WAN proxy)
    mono_start: float = 0.0  # time.monotonic() at spawn and after reaping
    mono_end: float = 0.0

    def cpu_of(self, label: str) -> float:
        return self.sampled.get(label, (0.0, 0, 0))[0]

    def hwm_of(self, label: str) -> int:
        return self.sampled.get(label, (0.0, 0, 0))[1]

    def anon_of(self, label: str) -> int:
        return self.sampled.get(label, (0.0, 0, 0))[2]


# Processes this module started and has not yet reaped, so a signal handler (or a
# finally) can end exactly those, by pid.
_RUNNING: dict[int, str] = {}


def kill_running() -> None:
    for pid in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _RUNNING and time.monotonic() < deadline:
        for pid in list(_RUNNING):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                _RUNNING.pop(pid, None)
        time.sleep(0.05)
    for pid in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        _RUNNING.pop(pid, None)


def _spawn(
    argv: list[str], *, cwd: str | None, stdin, stdout, stderr, env: dict[str, str] | None = None
) -> subprocess.Popen:
    p = subprocess.Popen(argv, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, env=env)
    _RUNNING[p.pid] = argv[0]
    return p


def _reap(p: subprocess.Popen, deadline: float) -> tuple[int, float, int]:
    """wait4 the process (killing it past the deadline): (exit code, cpu s, maxrss KiB)."""
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(p.pid, signal.SIGKILL)
            pid, status, ru = os.wait4(p.pid, 0)
            _RUNNING.pop(p.pid, None)
            p.returncode = -9
            raise RunFailed(f"{p.args[0]} ran past its time limit and was killed")
        time.sleep(0.002)
    _RUNNING.pop(p.pid, None)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def timed_run(
    argv: list[str],
    *,
    remote_root: int,
    cwd: str | None = None,
    stdin_path: str | None = None,
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run argv to completion; wall clock from just before spawn to its reaping."""
    with tempfile.TemporaryFile() as err, contextlib.ExitStack() as stack:
        stdin = stack.enter_context(open(stdin_path, "rb")) if stdin_path else subprocess.DEVNULL
        sampler = ProcSampler(remote_root)
        sampler.start()
        there_before = descendants({remote_root})
        busy0 = system_busy_ticks()
        m0 = time.monotonic()
        t0 = time.perf_counter()
        p = _spawn(argv, cwd=cwd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err, env=env)
        sampler.add_local_root(p.pid)
        try:
            code, cpu, maxrss = _reap(p, time.monotonic() + timeout)
        finally:
            wall = time.perf_counter() - t0
            m1 = time.monotonic()
            _settle(remote_root, keep=there_before)
            sampler.stop()
        err.seek(0)
        text = err.read().decode(errors="replace")
    if code != 0:
        raise RunFailed(f"{' '.join(argv[:6])} ... exited {code}: {text.strip()[-800:]}")
    res = _result(wall, cpu, maxrss, sampler, text, busy0)
    res.mono_start, res.mono_end = m0, m1
    return res


def timed_pair_run(
    left: list[str],
    right: list[str],
    *,
    remote_root: int,
    cwd: str | None = None,
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> RunResult:
    """``left`` and ``right`` with stdin+stdout of each joined by a socketpair.

    For the sshfs baseline: left is the local sftp-server, right the ssh that starts
    ``sshfs -o passive`` on the remote. Wall clock ends when both are reaped.
    """
    a, b = socket.socketpair()
    with tempfile.TemporaryFile() as err:
        sampler = ProcSampler(remote_root)
        sampler.start()
        busy0 = system_busy_ticks()
        m0 = time.monotonic()
        t0 = time.perf_counter()
        try:
            pl = _spawn(left, cwd=cwd, stdin=a, stdout=a, stderr=subprocess.DEVNULL, env=env)
            sampler.add_local_root(pl.pid)
            pr = _spawn(right, cwd=cwd, stdin=b, stdout=b, stderr=err, env=env)
            sampler.add_local_root(pr.pid)
        finally:
            a.close()
            b.close()
        try:
            deadline = time.monotonic() + timeout
            code_r, cpu_r, rss_r = _reap(pr, deadline)
            code_l, cpu_l, rss_l = _reap(pl, deadline)
        finally:
            wall = time.perf_counter() - t0
            m1 = time.monotonic()
            _settle(remote_root)
            sampler.stop()
        err.seek(0)
        text = err.read().decode(errors="replace")
    if code_r != 0:
        raise RunFailed(f"{' '.join(right[:6])} ... exited {code_r}: {text.strip()[-800:]}")
    res = _result(wall, cpu_r + cpu_l, max(rss_r, rss_l), sampler, text, busy0)
    res.mono_start, res.mono_end = m0, m1
    return res


def _result(wall, cpu, maxrss, sampler: ProcSampler, text: str, busy0: int) -> RunResult:
    system_cpu = (system_busy_ticks() - busy0) / CLK_TCK
    sampled = sampler.by_label()
    remote_cpu = sum(v[0] for v in sampler.by_label("remote").values())
    stats = None
    for line in reversed(text.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                stats = json.loads(line)
            break
    return RunResult(wall, cpu, maxrss, sampled, remote_cpu, system_cpu, text, stats)


def _settle(remote_root: int, timeout: float = 5.0, keep: set[int] = frozenset()) -> None:
    """Wait for the remote side of a finished connection to go away (``keep``: remote
    processes that were there before the run, a long-lived session's, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [
            p
            for p in descendants({remote_root}) - keep
            if (st := proc_stat(p)) is not None and st[4] not in "ZX"
        ]
        if not live:
            return
        time.sleep(0.02)


# --------------------------------------------------------------------------- facts


def wait_quiet(
    threshold_cores: float = 0.25, window: float = 0.5, timeout: float = 60.0
) -> tuple[float, bool]:
    """Wait until the whole machine is nearly idle (less than ``threshold_cores`` busy over
    ``window`` seconds), at most ``timeout`` s. Returns (seconds waited, quiet reached)."""
    t0 = time.monotonic()
    while True:
        b0 = system_busy_ticks()
        time.sleep(window)
        busy = (system_busy_ticks() - b0) / CLK_TCK / window
        if busy < threshold_cores:
            return time.monotonic() - t0, True
        if time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, False


def first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (p.stdout.strip() or p.stderr.strip()).splitlines()
    return out[0] if out else "?"


def machine_info() -> dict[str, str]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model + (" (AES-NI)" if re.search(r"\baes\b", flags) else " (no AES-NI)"),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ssh": first_line(["ssh", "-V"]),
        "sshfs": _sshfs_version(),
    }


def _sshfs_version() -> str:
    try:
        p = subprocess.run(["sshfs", "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = p.stdout + p.stderr
    m = re.search(r"SSHFS version (\S+)", text)
    f = re.search(r"FUSE library version (\S+)", text)
    return (m.group(1) if m else "?") + (f" (libfuse {f.group(1)})" if f else "")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_state(repo: Path) -> str:
    def git(*args: str) -> str:
        p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "topyaz_mount")
    return head + (" + uncommitted changes in topyaz_mount/" if dirty else "")


def negotiated_cipher(ssh_argv: list[str], extra: list[str] = ()) -> str:
    """The client->server cipher ssh negotiates (from ``ssh -v``)."""
    argv = [ssh_argv[0], "-v", *extra, *ssh_argv[1:], "true"]
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    m = re.search(r"kex: client->server cipher: (\S+)", p.stderr)
    return m.group(1) if m else "unknown"


# --------------------------------------------------------------------------- py-spy


def fold_pyspy_raw(path: Path, top: int = 8) -> tuple[int, list[tuple[float, str]]]:
    """(samples, [(percent, frame)]) of the frames with most self time in a raw profile."""
    counts: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frame = stack.split(";")[-1]
            frame = re.sub(r"\(/\S*/(site-packages|lib/python3[.\d]*)/", "(", frame)
            frame = re.sub(r"\(/\S*/(topyaz_mount/)", r"(\1", frame)
            counts[frame] += int(n)
            total += int(n)
    return total, [(100 * n / total, f) for f, n in counts.most_common(top)] if total else []


def fold_pyspy_inclusive(path: Path, top: int = 40) -> tuple[int, list[tuple[float, str]]]:
    """(samples, [(percent, function)]) by inclusive time: the share of samples whose
    stack holds the function anywhere (each counted once per stack)."""
    counts: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack or not n.isdigit():
                continue
            seen = set()
            for frame in stack.split(";"):
                frame = re.sub(r"\(/\S*/(site-packages|lib/python3[.\d]*)/", "(", frame)
                frame = re.sub(r"\(/\S*/(topyaz_mount/)", r"(\1", frame)
                frame = re.sub(r":\d+\)$", ")", frame)  # function, not line
                if frame not in seen:
                    seen.add(frame)
                    counts[frame] += int(n)
            total += int(n)
    return total, [(100 * n / total, f) for f, n in counts.most_common(top)] if total else []


def profile_run(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    remote_root: int,
    outdir: Path,
    tag: str,
    rate: int = 100,
    timeout: float = 900,
) -> dict:
    """Run argv (a topyaz-mount exec whose job should start with a short sleep, so py-spy
    is attached before the work starts) with py-spy on the client and on the agent.

    Returns {"wall": s, "client"/"agent": {"self": fold, "inclusive": fold}}, or {} when
    py-spy is missing."""
    import shutil

    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return {}
    before = {p for p in descendants({remote_root}) if b"topyaz_mount.agent" in proc_argv(p)}
    t0 = time.perf_counter()
    p = _spawn(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    agent = None
    deadline = time.monotonic() + 30
    while agent is None and time.monotonic() < deadline and p.poll() is None:
        for pid in descendants({remote_root}) - before:
            if b"topyaz_mount.agent" in proc_argv(pid):
                agent = pid
        time.sleep(0.01)
    spies = {}
    targets = {"client": p.pid} | ({"agent": agent} if agent else {})
    for name, pid in targets.items():
        spies[name] = _spawn(
            [
                pyspy,
                "record",
                "--nonblocking",
                "-r",
                str(rate),
                "-f",
                "raw",
                "-o",
                str(outdir / f"{tag}-{name}.raw"),
                "--pid",
                str(pid),
            ],
            cwd=None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    with contextlib.suppress(RunFailed):
        _reap(p, time.monotonic() + timeout)
    wall = time.perf_counter() - t0
    for spy in spies.values():
        with contextlib.suppress(RunFailed):
            _reap(spy, time.monotonic() + 30)
    out: dict = {"wall": wall}
    for name in targets:
        raw = outdir / f"{tag}-{name}.raw"
        out[name] = {"self": fold_pyspy_raw(raw), "inclusive": fold_pyspy_inclusive(raw)}
    return out


def write_random_file(path: Path, size: int, block_size: int = 64 << 20) -> None:
    """``size`` bytes: one random block of at most ``block_size`` repeated."""
    block = os.urandom(min(block_size, size))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, memoryview(block)[: min(len(block), left)])
    finally:
        os.close(fd)


def blake3_file(path: Path) -> bytes:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    return h.digest()


def freshen(path: Path) -> bytes:
    """New random first bytes (a content version no cache has); returns its blake3."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(16), 0)
    finally:
        os.close(fd)
    return blake3_file(path)


def remove_objects(store_dir: Path, digests) -> int:
    """Delete content-store objects by digest (as root, on this machine); returns count."""
    n = 0
    for d in digests:
        h = d.hex()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store_dir / "objects" / h[:2] / h)
            n += 1
    return n


def remote_tmp(env, prefix: str) -> str:
    """A new directory on the remote for staging baselines (under the bench run's private
    cache dir, removed with it); made over the direct connection, untimed."""
    import shlex

    base = shlex.quote(str(env.remote_cache))
    r = env.host.run(f"mktemp -d {base}/{prefix}.XXXXXX", timeout=60)
    path = r.stdout.strip()
    if r.returncode != 0 or not path:
        raise RunFailed(f"could not make a remote temp dir: {r.stderr}")
    return path


def drop_remote(env, path: str) -> None:
    import shlex

    env.host.run(f"rm -rf {shlex.quote(path)}", timeout=120)


def ab_heading(env, section: str, title: str, elapsed: float, base_desc: str) -> list[str]:
    """The first lines of a section that compares this tree with a base revision."""
    return [
        f"<!-- bench:{section}:start -->",
        f"## {title}",
        "",
        f"Run {env.date()} on {env.machine.get('cpu', '?')}; `{env.command}`; {elapsed:.0f} s.",
        f"- this: {env.source_desc}",
        f"- base: {base_desc}",
    ]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
    ]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    cells = [[re.sub(r"[`*]", "", str(c)) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    )


def mib(n: float) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n:.0f} B"


# The client run through this wrapper counts the requests it serves, by type, and prints
# them on stderr at exit: an untimed extra run, to show the round trips behind a figure.
COUNTING_CLI = """
import atexit, collections, json, sys
from topyaz_mount import cli
from topyaz_mount.client import fileserver
counts = collections.Counter()
_handle = fileserver.FileServer.handle
async def handle(self, req):
    counts[type(req).__name__] += 1
    return await _handle(self, req)
fileserver.FileServer.handle = handle
atexit.register(lambda: print("BENCH-REQUESTS " + json.dumps(dict(counts)), file=sys.stderr))
sys.argv[0] = "topyaz-mount"
cli.main()
"""


def count_requests(
    tm_argv: list[str], *, cwd: Path, env: dict[str, str], workdir: Path
) -> tuple[dict[str, int], str]:
    """Run a ``topyaz-mount exec`` argv (its program replaced by a wrapper of the same
    CLI that counts the requests the client serves); (counts by type, error or "")."""
    import sys

    script = workdir / "counting_cli.py"
    script.write_text(COUNTING_CLI)
    i = tm_argv.index("exec")
    argv = [sys.executable, str(script), *tm_argv[i:]]
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    m = re.search(r"^BENCH-REQUESTS (.*)$", p.stderr, re.M)
    counts = json.loads(m.group(1)) if m else {}
    return counts, (p.stderr.strip()[-300:] if p.returncode != 0 else "")


_ENTRY_POINTS = re.compile(
    r"^(<module>|main|exec_|_exec_async|_serve|serve|run|_run_peer|unrolled_run|"
    r"_run_module_as_main|_run_code|thread \(|Thread\.|invoke|Command\.|MultiCommand\.|"
    r"Group\.|BaseCommand\.|async_wrapper|handler\.<locals>|Peer\.run|WorkerThread|"
    r"_bootstrap)"
)


def interesting(incl: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Inclusive frames minus entry points and loops every stack passes through."""
    return [(p, f) for p, f in incl if "topyaz_mount" in f and not _ENTRY_POINTS.match(f)]
