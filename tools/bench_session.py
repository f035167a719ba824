"""The ``session`` section of tools/bench: a long-lived session against one-shot exec.

* start-up: ``exec --session NAME -- true`` through a mounted session, against the
  one-shot ``exec -- true`` and ``ssh host true``, interleaved, N runs each;
* edit visibility: a remote reader polls a small file through the session (open, read,
  close every 2 ms: the remote kernel answers from its caches until it is told
  otherwise); locally the file is rewritten in place with new bytes of the same size,
  and the time from the local write to the remote reader's first sight of the new
  bytes is taken from both ends' clocks (one machine, one clock), over N edits.

The session is started with ``mount --detach`` from the snapshot, in a runtime dir of
the bench run, and unmounted at the end (killed by pid if the unmount fails).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_lib as bl

POLLER = r"""
import sys, time
path, last = sys.argv[1], None
while True:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    if data != last:
        last = data
        print(data.decode(errors="replace").strip(), repr(time.time()), flush=True)
        if data.startswith(b"stop"):
            break
    time.sleep(0.002)
"""


def add_arguments(ap) -> None:
    g = ap.add_argument_group("session section")
    g.add_argument("--session-startups", type=int, default=None,
                   help="start-up runs of each kind (default 20; --quick 6)")
    g.add_argument("--session-edits", type=int, default=None,
                   help="local edits timed until seen remotely (default 20; --quick 8)")


class SessionBench:
    def __init__(self, env: SimpleNamespace, root: Path) -> None:
        self.env = env
        self.root = root
        self.bench = env.make_bench(root, 4096)
        self.runtime = Path(tempfile.mkdtemp(prefix="topyaz-bench-runtime-"))
        self.tm_env = {**self.bench.tm_env, "TOPYAZ_MOUNT_RUNTIME_DIR": str(self.runtime)}
        self.prog = self.bench.tm[: self.bench.tm.index("exec")]
        self.pid = 0

    def mount(self) -> None:
        b = self.bench
        argv = [*self.prog, "mount", "--remote", b.remote, "-F", str(self.env.host.ssh_config),
                "--remote-python", b.remote_python, "--root", str(self.root),
                "--name", "bench", "--detach"]
        r = subprocess.run(argv, env=self.tm_env, capture_output=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise bl.RunFailed(f"mount --detach failed: {r.stderr.decode()[-800:]}")
        status = subprocess.run([*self.prog, "status", "--json", "bench"], env=self.tm_env,
                                capture_output=True, timeout=60)
        self.pid = json.loads(status.stdout)[0]["pid"]
        # The session process (and its ssh) works for the runs: not a neighbour's CPU.
        helpers = [self.pid, *bl.descendants({self.pid})]
        self.bench.helper_cpu = lambda: sum(
            (st[2] / bl.CLK_TCK) for st in map(bl.proc_stat, helpers) if st
        )

    def unmount(self) -> None:
        if not self.pid:
            return
        r = subprocess.run([*self.prog, "unmount", "bench"], env=self.tm_env,
                           capture_output=True, timeout=120)
        if r.returncode != 0 and bl.proc_stat(self.pid) is not None:
            os.kill(self.pid, signal.SIGTERM)
        shutil.rmtree(self.runtime, ignore_errors=True)

    def session_argv(self, *command: str) -> list[str]:
        return [*self.prog, "exec", "--session", "bench", "--", *command]

    def startup(self, n: int) -> dict[str, bl.Series]:
        argvs = {
            "ssh": [*self.bench.ssh_argv(), "true"],
            "exec": [*self.bench.tm_argv(), "--", "true"],
            "session": self.session_argv("true"),
        }
        res = {k: bl.Series() for k in argvs}
        for key in argvs:  # one unrecorded warm-up each
            self.bench.run(argvs[key], env=self.tm_env)
        for i in range(n):
            order = list(argvs) if i % 2 == 0 else list(reversed(argvs))
            for key in order:
                res[key].add(self.bench.run(argvs[key], label=key, env=self.tm_env).wall)
        self.env.say(
            f"session: start-up ssh {res['ssh'].median:.3f} s, exec "
            f"{res['exec'].median:.3f} s, exec --session {res['session'].median:.3f} s"
        )
        return res

    def edits(self, n: int) -> bl.Series:
        target = self.root / "watched.txt"
        target.write_bytes(b"edit-000\n")
        poller = subprocess.Popen(
            self.session_argv("python3", "-c", POLLER, "watched.txt"),
            env=self.tm_env, cwd=self.root, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )
        seen = bl.Series()
        try:
            first = poller.stdout.readline()
            if not first.startswith("edit-000"):
                raise bl.RunFailed(f"the remote poller started with {first!r}")
            for i in range(1, n + 1):
                time.sleep(0.3)  # the kernel has cached the old bytes by now
                content = f"edit-{i:03d}\n".encode()
                t0 = time.time()
                with open(target, "r+b") as f:  # in place, same size: an editor's save
                    f.write(content)
                line = poller.stdout.readline().split()
                if not line or line[0] != content.decode().strip():
                    raise bl.RunFailed(f"the remote poller saw {line!r} after edit {i}")
                seen.add(float(line[1]) - t0)
            target.write_bytes(b"stop-000\n")
            poller.wait(timeout=30)
        finally:
            if poller.poll() is None:
                poller.kill()
        self.env.say(f"session: edit seen after {seen.median * 1000:.0f} ms (median)")
        return seen


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    n_start = args.session_startups or (6 if args.quick else 20)
    n_edits = args.session_edits or (8 if args.quick else 20)
    t0 = time.perf_counter()
    load_before = bl.loadavg()
    root = Path(tempfile.mkdtemp(prefix="topyaz-bench-session-"))
    os.chmod(root, 0o700)
    (root / "big.bin").write_bytes(b"\0" * 4096)
    sb = SessionBench(env, root)
    try:
        sb.mount()
        start = sb.startup(n_start)
        seen = sb.edits(n_edits)
    finally:
        sb.unmount()
        shutil.rmtree(root, ignore_errors=True)
    return report(env, sb, start, seen, time.perf_counter() - t0, load_before)


def report(env, sb: SessionBench, start: dict[str, bl.Series], seen: bl.Series,
           elapsed: float, load_before: str) -> tuple[str, str, bool]:
    ssh, exe, ses = start["ssh"], start["exec"], start["session"]
    header = ["", "median", "min–max", "× `ssh host true`"]
    rows = [
        ["`ssh host true`", f"{ssh.median:.3f} s", f"{ssh.min:.3f}–{ssh.max:.3f} s", "1.0×"],
        ["`exec -- true` (one-shot)", f"{exe.median:.3f} s", f"{exe.min:.3f}–{exe.max:.3f} s",
         f"{exe.median / ssh.median:.2f}×"],
        ["`exec --session S -- true`", f"{ses.median:.3f} s",
         f"{ses.min:.3f}–{ses.max:.3f} s", f"{ses.median / ssh.median:.2f}×"],
    ]
    edit_row = [[f"local write → seen remotely ({seen.n} edits)",
                 f"{seen.median * 1000:.0f} ms",
                 f"{seen.min * 1000:.0f}–{seen.max * 1000:.0f} ms", "–"]]
    start_marker, end_marker = "<!-- bench:session:start -->", "<!-- bench:session:end -->"
    lines = [
        start_marker,
        "## Long-lived session (`tools/bench --only session`)",
        "",
        f"Run {env.date()} on {env.machine['nproc']} × {env.machine['cpu']}; source "
        f"{env.source_desc}; load before {load_before}; {elapsed:.0f} s in all. "
        f"`{env.command}`",
        "",
        "* Start-up: one `mount --detach` session on loopback, then `exec --session S -- "
        "true`, one-shot `exec -- true` and `ssh host true` interleaved, "
        f"{ses.n} runs each after one unrecorded warm-up; wall clock from spawn to exit. "
        f"Runs during which other processes took more than {env.args.max_foreign:g} cores "
        f"were repeated: {len(sb.bench.discarded)} repeated, {len(sb.bench.disturbed)} kept "
        "after the last retry.",
        "* Edit visibility: a remote Python reader polls `watched.txt` through the session "
        "(open, read, close every 2 ms); the client rewrites it in place with new bytes of "
        "the same size; the time from just before the local write to the reader's first "
        "sight of the new bytes, on the one clock both ends share. The path: watchfiles "
        "(inotify, 30 ms quiet gap) → `Invalidate` → agent drops its copy and the remote "
        "kernel's (entry, attributes, pages) → the reader's next open fetches anew.",
        "",
        *bl.md_table(header, rows + edit_row),
        "",
        f"`exec --session` starts **{exe.median / ses.median:.1f}× faster** than the one-shot "
        f"exec ({ses.median:.3f} s against {exe.median:.3f} s): no ssh connection, agent "
        f"start or mount, only a local socket and the translation; what is left is the "
        f"client's Python start-up and one round trip to start the job. A local edit is "
        f"visible remotely after {seen.median * 1000:.0f} ms (median; the target is about "
        f"a second).",
        end_marker,
    ]
    table = bl.text_table(header, rows + edit_row)
    return "\n".join(lines) + "\n", table, True
