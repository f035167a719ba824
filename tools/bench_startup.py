"""The ``startup`` section of tools/bench: what an ``exec -- true`` costs against ssh's.

On loopback and through tools/wanproxy.py (the ``wan`` section's emulated link, 20 ms
RTT), interleaved, N rounds of:

* ``ssh host true``, the baseline;
* base: ``exec -- true`` of a base revision's snapshot (``--startup-base``, default
  ``main``), the one-shot exec as it was;
* ``exec --persist 0 -- true``: one-shot, nothing left behind;
* first: ``exec -- true`` with no session up, so it starts one and leaves it
  (``--persist``, persist.py); timed to its exit, the session staying up;
* second: the same again, which reuses that session; then the session is unmounted
  (untimed), so the next round's first starts from nothing.

The sessions' runtime dir is this run's own. Their process (and its ssh) works for the
runs, so its CPU is not a neighbour's: found by that runtime dir in its environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_lib as bl
import bench_wan

KINDS = ("ssh", "base", "persist0", "first", "second")
LABELS = {
    "ssh": "`ssh host true`",
    "base": "base `exec -- true` (one-shot)",
    "persist0": "`exec --persist 0 -- true`",
    "first": "first `exec -- true` (starts a session)",
    "second": "second `exec -- true` (reuses it)",
}
TARGETS = {"persist0": 1.6, "first": 1.6, "second": 1.2}


def add_arguments(ap) -> None:
    g = ap.add_argument_group("startup section")
    g.add_argument("--startup-runs", type=int, default=None, help="rounds (default 10; --quick 4)")
    g.add_argument("--startup-base", default="main", help="revision of the base (default main)")


class SessionCpu:
    """CPU seconds of the processes started for a runtime dir (the sessions and their
    ssh), found by that dir in their environment; a process that ended keeps counting
    what it used, so the figure never goes down."""

    def __init__(self, runtime: Path) -> None:
        self.mark = f"TOPYAZ_MOUNT_RUNTIME_DIR={runtime}".encode()
        self.seen: dict[tuple[int, int], float] = {}  # (pid, start time): CPU seconds

    def __call__(self) -> float:
        roots = set()
        for pid in bl.all_pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if self.mark in environ.split(b"\0"):
                roots.add(pid)
        for pid in roots | bl.descendants(roots):
            st = bl.proc_stat(pid)
            if st is not None:
                self.seen[(pid, st[3])] = st[2] / bl.CLK_TCK
        return sum(self.seen.values())


class Link:
    """One link's benches (this tree and the base) and results."""

    def __init__(self, env, root: Path, base_snap: Path, port: int | None, proxy) -> None:
        self.env = env
        self.root = root
        self.runtime = Path(tempfile.mkdtemp(prefix="topyaz-bench-runtime-"))
        self.this = env.make_bench(root, 4096, port=port)
        self.base = env.make_bench(root, 4096, snap=base_snap, port=port)
        sessions = SessionCpu(self.runtime)
        for b in (self.this, self.base):
            b.helper_cpu = lambda: sessions() + (
                bench_wan.cpu_seconds(proxy.pid) if proxy is not None else 0.0
            )
        common = {**self.this.tm_env, "TOPYAZ_MOUNT_RUNTIME_DIR": str(self.runtime)}
        self.envs = {
            "persist0": common,
            "first": {**common, "TOPYAZ_MOUNT_PERSIST": "10m"},
            "second": {**common, "TOPYAZ_MOUNT_PERSIST": "10m"},
        }
        self.prog = self.this.tm[: self.this.tm.index("exec")]
        self.res = {k: bl.Series() for k in KINDS}

    def argv(self, kind: str) -> list[str]:
        if kind == "ssh":
            return [*self.this.ssh_argv(), "true"]
        bench = self.base if kind == "base" else self.this
        return [*bench.tm_argv(), "--", "true"]

    def once(self, kind: str, record: bool = True) -> None:
        bench = self.base if kind == "base" else self.this
        env = self.envs.get(kind, bench.tm_env)

        def attempt() -> bl.RunResult:
            if kind == "first":  # a repeated run (foreign load) must start from nothing too
                self.unmount_all()
            return bl.timed_run(
                self.argv(kind), remote_root=self.env.host.pid, cwd=str(self.root), env=env
            )

        res = bench.measure(f"startup {kind}", attempt)
        if kind in ("first", "second") and self.sessions() != 1:
            raise bl.RunFailed(f"{kind}: expected one session up, found {self.sessions()}")
        if record:
            self.res[kind].add(res.wall)

    def sessions(self) -> int:
        return len(self.status())

    def status(self) -> list[dict]:
        r = subprocess.run([*self.prog, "status", "--json"], env=self.envs["first"],
                           capture_output=True, timeout=60)
        return json.loads(r.stdout or b"[]")

    def unmount_all(self) -> None:
        for s in self.status():
            subprocess.run([*self.prog, "unmount", s["name"]], env=self.envs["first"],
                           capture_output=True, timeout=120)

    def round(self, i: int, record: bool = True) -> None:
        singles = ["ssh", "base", "persist0"]
        order = [*singles, "pair"] if i % 2 == 0 else ["pair", *reversed(singles)]
        for kind in order:
            if kind != "pair":
                self.once(kind, record)
                continue
            self.once("first", record)
            self.once("second", record)
            self.unmount_all()

    def close(self) -> None:
        self.unmount_all()
        shutil.rmtree(self.runtime, ignore_errors=True)


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    rounds = args.startup_runs or (4 if args.quick else 10)
    t0 = time.perf_counter()
    load_before = bl.loadavg()
    base_snap, base_desc = env.make_snapshot(args.startup_base)
    root = Path(tempfile.mkdtemp(prefix="topyaz-bench-startup-"))
    (root / "big.bin").write_bytes(b"\0" * 4096)  # the benches' content file
    results: dict[str, Link] = {}
    try:
        for link in ("loopback", "wan"):
            proxy, port = None, None
            if link == "wan":
                proxy, port = bench_wan.start_proxy(
                    env.host.port, args.wan_delay_ms, args.wan_rate_mbit,
                    env.workdir / "wanproxy-startup.log",
                )
            lk = Link(env, root, base_snap, port, proxy)
            try:
                lk.round(1, record=False)  # warm-up
                for i in range(rounds):
                    lk.round(i)
                env.say(f"startup {link}: " + ", ".join(
                    f"{k} {lk.res[k].median:.3f} s" for k in KINDS))
            finally:
                lk.close()
                if proxy is not None:
                    bench_wan.stop_proxy(proxy)
            results[link] = lk
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base_snap, ignore_errors=True)
    return report(env, results, base_desc, rounds, time.perf_counter() - t0, load_before)


def report(env, results: dict[str, Link], base_desc: str, rounds: int, elapsed: float,
           load_before: str) -> tuple[str, str, bool]:
    header = ["", *(f"{link} median" for link in results), *(f"{link} × ssh" for link in results),
              "target"]
    rows = []
    ok = True
    for kind in KINDS:
        meds = [results[link].res[kind].median for link in results]
        ratios = [results[link].res[kind].median / results[link].res["ssh"].median
                  for link in results]
        target = TARGETS.get(kind)
        ok = ok and (target is None or all(r <= target for r in ratios))
        rows.append([LABELS[kind], *(f"{m:.3f} s" for m in meds),
                     *(f"{r:.2f}×" for r in ratios), f"≤ {target}×" if target else "–"])
    discarded = sum(len(lk.this.discarded) + len(lk.base.discarded) for lk in results.values())
    args = env.args
    md = [
        "<!-- bench:startup:start -->",
        "## Start-up: a one-shot exec against `ssh host true` (`tools/bench --only startup`)",
        "",
        f"Run {env.date()} on {env.machine['nproc']} × {env.machine['cpu']}; load before "
        f"{load_before}; {elapsed:.0f} s in all. `{env.command}`",
        f"- this: {env.source_desc}",
        f"- base: {base_desc}",
        f"- {rounds} rounds after one warm-up, the order of each round reversed every other "
        "round; a round: `ssh host true`, the base's one-shot `exec -- true`, this tree's "
        "`exec --persist 0 -- true`, then a first `exec -- true` with no session up (it "
        "starts one and leaves it), a second one (which reuses it), and an untimed "
        "`unmount`. Wall clock from spawn to exit, medians. "
        f"wan: through tools/wanproxy.py, {args.wan_delay_ms:g} ms each way, "
        f"{args.wan_rate_mbit:g} Mbit/s. {discarded} runs discarded for foreign load and "
        "repeated.",
        "",
        *bl.md_table(header, rows),
        "<!-- bench:startup:end -->",
        "",
    ]
    return "\n".join(md), bl.text_table(header, rows), ok
