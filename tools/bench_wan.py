"""The ``wan`` section of tools/bench: everything through tools/wanproxy.py.

The test host's sshd is put behind the WAN emulator (default 10 ms each way, 200 Mbit/s
per direction) and every run of this section connects through it: topyaz-mount, the
raw ssh pipe, reverse sshfs, rsync. Scenarios, each against its baselines from the same
run:

* one big input (256 MiB): raw pipe ``ssh host 'cat > /dev/null' < big.bin``;
  topyaz-mount cold (new bytes, so the remote store lacks them) and warm (the same
  again); reverse sshfs; staging: ``rsync -a`` up into a new remote temp dir, then
  ``ssh host cat …/big.bin > /dev/null`` (no output to bring back);
* 500 × 256 KiB read by a batch job that names the directory: topyaz-mount cold and
  warm; ``rsync -a`` into a new remote temp dir (and rsync + the same job over ssh);
  reverse sshfs;
* start-up: ``exec -- true`` against ``ssh host true`` (and ``ssh host true`` without
  the proxy, to check the emulated round trips).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_lib as bl

TOOLS_DIR = Path(__file__).resolve().parent
SMALL_JOB = (
    'import os,sys; [open(os.path.join(sys.argv[1],f),"rb").read() '
    "for f in sorted(os.listdir(sys.argv[1]))]"
)
BIG_CMD = "cat big.bin > /dev/null"
AGENT = "agent (python)"

_PROXIES: list[subprocess.Popen] = []
LOG_INTERVAL = 0.1  # the proxy logs the bytes put on each link this often


def add_arguments(ap) -> None:
    g = ap.add_argument_group("wan section")
    g.add_argument("--wan-runs", type=int, default=None, help="runs of each (default 2; --quick 1)")
    g.add_argument("--wan-big-mib", type=int, default=256, help="big input (default 256)")
    g.add_argument("--wan-small-count", type=int, default=500, help="small inputs (500)")
    g.add_argument("--wan-small-kib", type=int, default=256, help="small input size (256)")
    g.add_argument("--wan-delay-ms", type=float, default=10.0, help="one-way delay (10)")
    g.add_argument("--wan-rate-mbit", type=float, default=200.0, help="per direction (200)")
    g.add_argument("--wan-no-sshfs-small", action="store_true", help="skip sshfs on small files")


# --------------------------------------------------------------------------- the proxy


def start_proxy(
    target_port: int, delay_ms: float, rate_mbit: float, log: Path, listen_port: int = 0
):
    """Start tools/wanproxy.py in front of 127.0.0.1:target_port; (Popen, its port).
    ``listen_port``: that port (a link brought back after a cut), else any."""
    err = open(log, "ab")  # noqa: SIM115 - the proxy keeps it until it ends
    p = subprocess.Popen(
        [
            sys.executable,
            str(TOOLS_DIR / "wanproxy.py"),
            "--target",
            f"127.0.0.1:{target_port}",
            "--listen",
            f"127.0.0.1:{listen_port}",
            "--delay-ms",
            str(delay_ms),
            "--rate-mbit",
            str(rate_mbit),
            "--log-interval",
            str(LOG_INTERVAL),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    err.close()
    _PROXIES.append(p)
    line = p.stdout.readline() if p.stdout else ""
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        stop_proxy(p)
        raise bl.RunFailed(f"wanproxy did not start: {line!r} {log.read_text()[-300:]}")
    return p, int(m.group(1))


def stop_proxy(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in _PROXIES:
        _PROXIES.remove(p)


def stop_proxies() -> None:
    for p in list(_PROXIES):
        stop_proxy(p)


def cpu_seconds(pid: int) -> float:
    st = bl.proc_stat(pid)
    return st[2] / bl.CLK_TCK if st else 0.0


# --------------------------------------------------------------------------- the runs


class WanBench:
    def __init__(self, env: SimpleNamespace, root: Path, port: int, proxy) -> None:
        self.env = env
        self.root = root
        self.port = port
        self.big = (root / "big.bin").stat().st_size
        self.count = len(list((root / "small").iterdir()))
        self.small_bytes = sum(p.stat().st_size for p in (root / "small").iterdir())
        self.bench = env.make_bench(root, self.big, port=port, sync_before=True)
        self.bench.helper_cpu = lambda: cpu_seconds(proxy.pid)
        self.proxy_log = env.workdir / "wanproxy.log"
        self.direct = env.make_bench(
            root, self.big, sync_before=True
        )  # no proxy: the emulator check
        self.res: dict[str, list[bl.RunResult]] = {}
        self.extra: dict[str, bl.Series] = {}
        self.digests: list[bytes] = []
        self.notes: list[str] = []
        ssh = self.bench.ssh_argv()
        # rsync's remote shell: the same ssh, config and proxy port
        self.rsync_e = shlex.join([ssh[0], "-F", ssh[ssh.index("-F") + 1], "-p", str(port)])
        self.dest = ssh[-1]

    def add(self, key: str, res: bl.RunResult) -> None:
        self.res.setdefault(key, []).append(res)

    def add_extra(self, key: str, value: float) -> None:
        self.extra.setdefault(key, bl.Series()).add(value)

    def timed(self, argv: list[str], **kw) -> bl.RunResult:
        kw.setdefault("env", self.bench.tm_env)
        return bl.timed_run(argv, remote_root=self.env.host.pid, cwd=str(self.root), **kw)

    # --- start-up -------------------------------------------------------------------

    def startup(self) -> None:
        b = self.bench
        self.add("ssh_true", b.run([*b.ssh_argv(), "true"], label="wan ssh true"))
        self.add("tm_true", b.run([*b.tm_argv(), "--", "true"], label="wan exec true"))
        d = self.direct
        self.add("ssh_true_direct", d.run([*d.ssh_argv(), "true"], label="ssh true direct"))

    def startup_slope(self, delay_ms: float, rate_mbit: float, n_runs: int) -> None:
        """``ssh host true`` and ``exec -- true`` through a second proxy with a longer
        delay: with the main proxy's figures, how much of each start-up is per round
        trip and how much is fixed (CPU). Also the Python start-up of each end alone."""
        proxy, port = start_proxy(
            self.env.host.port, delay_ms, rate_mbit, self.env.workdir / "wanproxy2.log"
        )
        try:
            b = self.env.make_bench(self.root, self.big, port=port, sync_before=True)
            b.helper_cpu = lambda: cpu_seconds(proxy.pid)
            b.run([*b.ssh_argv(), "true"])  # warm-up
            for _ in range(n_runs):
                self.add("ssh_true_slow", b.run([*b.ssh_argv(), "true"], label="ssh true slow"))
                self.add(
                    "tm_true_slow", b.run([*b.tm_argv(), "--", "true"], label="exec true slow")
                )
            self.bench.discarded += b.discarded
            self.bench.disturbed += b.disturbed
            self.bench.quiet_waited += b.quiet_waited
        finally:
            stop_proxy(proxy)
        self.slow_delay = delay_ms / 1000
        py = str(self.env.snap / "python")
        agent_imports = (
            "import topyaz_mount.agent.__main__, topyaz_mount.agent.session, "
            "topyaz_mount.agent.fs, pyfuse3"
        )
        client = [*self.bench.tm[: self.bench.tm.index("exec")], "--version"]
        for key, argv in (("py_agent", [py, "-c", agent_imports]), ("py_client", client)):
            for _ in range(3):
                t = time.perf_counter()
                subprocess.run(argv, env=self.bench.tm_env, capture_output=True, check=False)
                self.add_extra(key, time.perf_counter() - t)

    # --- big ------------------------------------------------------------------------

    def big_raw(self) -> None:
        b = self.bench
        self.add(
            "big_raw",
            b.run(
                [*b.ssh_argv(), "cat > /dev/null"],
                label="wan raw pipe",
                stdin_path=str(self.root / "big.bin"),
            ),
        )

    def big_tm(self) -> None:
        b = self.bench
        argv = [*b.tm_argv(), "--", "sh", "-c", BIG_CMD]

        def cold():
            self.digests.append(bl.freshen(self.root / "big.bin"))
            return self.timed(argv)

        self.add("big_cold", b.measure("wan big cold", cold))
        self.add("big_warm", b.measure("wan big warm", lambda: self.timed(argv)))

    def big_sshfs(self) -> None:
        res, cat = self.bench.read_sshfs(label="wan sshfs big")
        self.add("big_sshfs", res)
        self.add_extra("big_sshfs_cat", cat)

    def big_staging(self) -> None:
        ssh = self.bench.ssh_argv()

        def once():
            tmp = bl.remote_tmp(self.env, "rsync")
            script = (
                't0=$(date +%s.%N); rsync -a -e "$RSH" big.bin "$DEST:$TMP/" || exit 1; '
                't1=$(date +%s.%N); "$@" "cat $TMP/big.bin > /dev/null" || exit 1; '
                't2=$(date +%s.%N); echo "BENCH-T $t0 $t1 $t2" >&2'
            )
            env = dict(self.bench.tm_env, RSH=self.rsync_e, DEST=self.dest, TMP=tmp)
            try:
                return self.timed(["sh", "-c", script, "sh", *ssh], env=env)
            finally:
                bl.drop_remote(self.env, tmp)

        res = self.bench.measure("wan staging big", once)
        t = stamps(res)
        self.add("big_staging", res)
        self.add_extra("big_staging_rsync", t[1] - t[0])
        self.add_extra("big_staging_job", t[2] - t[1])

    # --- small ----------------------------------------------------------------------

    def small_tm(self) -> None:
        b = self.bench
        argv = [*b.tm_argv(), "--", "python3", "-c", SMALL_JOB, "small"]

        def cold():
            for path in sorted((self.root / "small").iterdir()):
                self.digests.append(bl.freshen(path))
            return self.timed(argv)

        self.add("small_cold", b.measure("wan small cold", cold))
        self.add("small_warm", b.measure("wan small warm", lambda: self.timed(argv)))

    def small_rsync(self) -> None:
        ssh = self.bench.ssh_argv()

        def once():
            tmp = bl.remote_tmp(self.env, "rsync")
            script = (
                't0=$(date +%s.%N); rsync -a -e "$RSH" small "$DEST:$TMP/" || exit 1; '
                't1=$(date +%s.%N); "$@" "cd $TMP && python3 -c \'$JOB\' small" || exit 1; '
                't2=$(date +%s.%N); echo "BENCH-T $t0 $t1 $t2" >&2'
            )
            env = dict(self.bench.tm_env, RSH=self.rsync_e, DEST=self.dest, TMP=tmp, JOB=SMALL_JOB)
            try:
                return self.timed(["sh", "-c", script, "sh", *ssh], env=env)
            finally:
                bl.drop_remote(self.env, tmp)

        res = self.bench.measure("wan rsync small", once)
        t = stamps(res)
        self.add("small_rsync_job", res)
        self.add_extra("small_rsync", t[1] - t[0])
        self.add_extra("small_rsync_jobonly", t[2] - t[1])

    def small_sshfs(self) -> None:
        cmd = f'python3 -c {shlex.quote(SMALL_JOB)} "$m/small"'
        res, job = self.bench.read_sshfs(cmd, label="wan sshfs small")
        self.add("small_sshfs", res)
        self.add_extra("small_sshfs_job", job)

    def count_requests(self) -> dict[str, dict[str, int]]:
        """An untimed cold and warm small-file run, the client counting its requests."""
        argv = [*self.bench.tm_argv(), "--", "python3", "-c", SMALL_JOB, "small"]
        for path in sorted((self.root / "small").iterdir()):
            self.digests.append(bl.freshen(path))
        out = {}
        for key in ("small_cold", "small_warm"):
            counts, err = bl.count_requests(
                argv, cwd=self.root, env=self.bench.tm_env, workdir=self.env.workdir
            )
            out[key] = counts
            if err:
                self.notes.append(f"request count run {key} failed: {err}")
        self.drop_objects()
        return out

    def drop_objects(self) -> None:
        bl.remove_objects(self.env.store_dir, self.digests)
        self.digests = []


def read_link_log(path: Path) -> list[tuple[float, int]]:
    """(monotonic time, bytes put on the client -> remote link so far), from the proxy."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for m in re.finditer(r"^t=(\S+) up_bytes=(\d+)", text, re.M):
        out.append((float(m.group(1)), int(m.group(2))))
    return out


def link_use(log: list[tuple[float, int]], res: bl.RunResult, rate: float) -> dict | None:
    """Where a run's wall clock went on the client -> remote link: seconds before the
    first and after the last interval at ≥ half the link's rate, and seconds at it."""
    pts = [(t, b) for t, b in log if res.mono_start - LOG_INTERVAL <= t <= res.mono_end + 0.05]
    if len(pts) < 2 or not res.mono_end:
        return None
    busy = [
        t1
        for (t0, b0), (t1, b1) in zip(pts, pts[1:], strict=False)
        if (b1 - b0) / max(t1 - t0, 1e-9) >= 0.5 * rate
    ]
    wall = res.mono_end - res.mono_start
    if not busy:
        return {"wall": wall, "before": wall, "busy": 0.0, "gaps": 0.0, "after": 0.0}
    first = max(busy[0] - LOG_INTERVAL - res.mono_start, 0.0)
    last = min(busy[-1] - res.mono_start, wall)
    n_busy = len(busy) * LOG_INTERVAL
    return {
        "wall": wall,
        "before": first,
        "busy": n_busy,
        "gaps": max(last - first - n_busy, 0.0),
        "after": max(wall - last, 0.0),
    }


def stamps(res: bl.RunResult) -> list[float]:
    m = re.search(r"BENCH-T (\S+) (\S+) (\S+)", res.stderr)
    if not m:
        raise bl.RunFailed(f"no timestamps in: {res.stderr[-300:]}")
    return [float(x) for x in m.groups()]


def make_root(big: int, count: int, small: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="topyaz-bench-wan-"))
    os.chmod(root, 0o700)
    bl.write_random_file(root / "big.bin", big)
    (root / "small").mkdir()
    for i in range(count):
        with open(root / "small" / f"in{i:05d}.bin", "wb") as fh:
            fh.write(os.urandom(small))
    return root


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    n = args.wan_runs or (1 if args.quick else 2)
    big = args.wan_big_mib << 20
    count, small = args.wan_small_count, args.wan_small_kib << 10
    t0 = time.perf_counter()
    load_before = bl.loadavg()
    notes = []
    limit = long_job_killed(env)
    if limit:
        nominal = args.wan_rate_mbit * 1e6 / 8
        fit = big
        while fit > (16 << 20) and fit / nominal > limit - 3:
            fit //= 2
        notes.append(
            f"**At this commit a remote command that runs longer than about {limit:.0f} s is "
            f"killed** (`exec -- sleep {limit + 1:.0f}` exited 137, SIGKILL, without being "
            f"interrupted)"
            + (
                f"; the big input is therefore {fit >> 20} MiB instead of {big >> 20} MiB, "
                f"so that every topyaz-mount job here ends in time"
                if fit != big
                else ""
            )
            + "."
        )
        env.say("wan: " + notes[-1])
        big = fit
    env.say(f"wan: writing a {big >> 20} MiB file and {count} x {small >> 10} KiB files")
    root = make_root(big, count, small)
    proxy = None
    wb = None
    try:
        proxy, port = start_proxy(
            env.host.port, args.wan_delay_ms, args.wan_rate_mbit, env.workdir / "wanproxy.log"
        )
        env.say(
            f"wan: proxy pid {proxy.pid} on 127.0.0.1:{port} -> {env.host.port} "
            f"({args.wan_delay_ms:g} ms each way, {args.wan_rate_mbit:g} Mbit/s)"
        )
        wb = WanBench(env, root, port, proxy)
        wb.notes += notes
        # unrecorded warm-ups
        wb.bench.run([*wb.bench.ssh_argv(), "true"])
        wb.bench.run([*wb.bench.tm_argv(), "--", "true"])
        with_sshfs = env.with_sshfs
        for i in range(n):
            for _ in range(2):
                wb.startup()
            steps = [wb.big_raw, wb.big_tm, wb.big_staging]
            if with_sshfs:
                steps.append(wb.big_sshfs)
            steps += [wb.small_tm, wb.small_rsync]
            if with_sshfs and not args.wan_no_sshfs_small:
                steps.append(wb.small_sshfs)
            if i % 2:
                steps.reverse()
            for step in steps:
                step()
                last = {k: v[-1].wall for k, v in wb.res.items() if v}
                env.say(f"wan run {i + 1}/{n} {step.__name__}: " + summary(step.__name__, last))
            wb.drop_objects()
        env.say("wan: start-up at a second delay (fixed cost against round trips)")
        wb.startup_slope(args.wan_delay_ms * 2.5, args.wan_rate_mbit, n_runs=3)
        env.say("wan: counting the client's requests (untimed small-file runs)")
        counts = wb.count_requests()
        prof = None
        if args.profile:
            prof = profile_small_warm(env, wb)
        md, table, ok = report(env, wb, n, prof, counts, time.perf_counter() - t0, load_before)
        return md, table, ok
    finally:
        if wb is not None:
            wb.drop_objects()
        if proxy is not None:
            stop_proxy(proxy)
        shutil.rmtree(root, ignore_errors=True)


def long_job_killed(env, seconds: float = 10.0) -> float:
    """0 if ``exec -- sleep N`` (N a little over ``seconds``) runs to its end; else
    ``seconds``: commands that run longer are killed at this commit (loopback, untimed)."""
    tiny = Path(tempfile.mkdtemp(prefix="topyaz-bench-wan-probe-"))
    try:
        (tiny / "big.bin").write_bytes(b"x")
        b = env.make_bench(tiny, 1)
        argv = [*b.tm_argv(), "--", "sleep", f"{seconds + 1:g}"]
        p = subprocess.run(
            argv, cwd=tiny, env=b.tm_env, capture_output=True, text=True, timeout=120
        )
        return seconds if p.returncode == 137 else 0.0
    finally:
        shutil.rmtree(tiny, ignore_errors=True)


def summary(step: str, last: dict[str, float]) -> str:
    keys = {
        "big_raw": ["big_raw"],
        "big_tm": ["big_cold", "big_warm"],
        "big_sshfs": ["big_sshfs"],
        "big_staging": ["big_staging"],
        "small_tm": ["small_cold", "small_warm"],
        "small_rsync": ["small_rsync_job"],
        "small_sshfs": ["small_sshfs"],
    }.get(step, [])
    return ", ".join(f"{k} {last[k]:.2f} s" for k in keys if k in last)


def profile_small_warm(env, wb: WanBench) -> dict:
    """py-spy on one more warm run of the small-file job through the proxy (after an
    untimed cold run that puts the inputs in the store)."""
    b = wb.bench
    for path in sorted((wb.root / "small").iterdir()):
        wb.digests.append(bl.freshen(path))
    cold = [*b.tm_argv(), "--", "python3", "-c", SMALL_JOB, "small"]
    subprocess.run(cold, cwd=wb.root, env=b.tm_env, capture_output=True, check=False)
    tail = ["sh", "-c", 'sleep 0.5; exec python3 -c "$0" "$1"', SMALL_JOB, "small"]
    try:
        return bl.profile_run(
            [*b.tm_argv(), "--", *tail],
            cwd=str(wb.root),
            env=b.tm_env,
            remote_root=env.host.pid,
            outdir=env.workdir,
            tag="wan-small-warm",
        )
    finally:
        wb.drop_objects()


# --------------------------------------------------------------------------- report


def walls(rs) -> bl.Series:
    return bl.Series([r.wall for r in rs])


def smed(rs, key: str) -> float:
    return statistics.median([float((r.stats or {}).get(key, 0)) for r in rs])


def report(env, wb: WanBench, n: int, prof, counts, elapsed: float, load_before: str):
    args = env.args
    res, ex = wb.res, wb.extra
    big, count, small_total = wb.big, wb.count, wb.small_bytes
    size_small = small_total // max(count, 1)
    big_label = f"{big >> 20} MiB"
    small_label = f"{count} × {size_small >> 10} KiB"
    nominal = args.wan_rate_mbit * 1e6 / 8 / 1e6  # MB/s
    rtt = 2 * args.wan_delay_ms / 1000
    W = {k: walls(v) for k, v in res.items()}
    ssh_t, tm_t, direct_t = W["ssh_true"], W["tm_true"], W["ssh_true_direct"]
    raw = W["big_raw"]
    raw_mb = bl.mbps(big, raw.median)
    ok = True

    def rate(nbytes, s: bl.Series) -> str:
        return f"{bl.mbps(nbytes, s.median):.1f}"

    def span(s: bl.Series) -> str:
        return f"{s.min:.2f}–{s.max:.2f} s"

    rows = []

    def add(label, key_or_series, nbytes, vs, content="–", target="–"):
        s = key_or_series if isinstance(key_or_series, bl.Series) else W[key_or_series]
        rows.append(
            [
                label,
                f"{s.median:.2f} s",
                span(s),
                rate(nbytes, s) if nbytes else "–",
                vs,
                content,
                target,
                str(s.n),
            ]
        )

    def content(key):
        return bl.mib(smed(res[key], "content_bytes_sent"))

    # big input
    add(f"{big_label}: raw pipe `ssh host 'cat > /dev/null' < big.bin`", "big_raw", big, "1.00")
    c = W["big_cold"]
    big_ratio = raw.median / c.median
    add(
        f"{big_label}: topyaz-mount cold (`exec -- sh -c '{BIG_CMD}'`)",
        "big_cold",
        big,
        f"{big_ratio:.2f} of raw",
        content("big_cold"),
        f"≥ 0.95 of raw: **{'met' if big_ratio >= 0.95 else 'missed'}**",
    )
    have_sshfs = "big_sshfs" in W
    w = W["big_warm"]
    warm_sent = smed(res["big_warm"], "content_bytes_sent")
    if have_sshfs:
        sp = W["big_sshfs"].median / w.median
        add(
            f"{big_label}: topyaz-mount warm (same job again)",
            "big_warm",
            0,
            f"{sp:.1f}× faster than sshfs",
            content("big_warm"),
            f"≥ 10× sshfs and 0 B: **{'met' if sp >= 10 and warm_sent == 0 else 'missed'}**",
        )
        add(
            f"{big_label}: reverse sshfs (connect, mount, `cat`, unmount)",
            "big_sshfs",
            big,
            f"{raw.median / W['big_sshfs'].median:.2f} of raw",
        )
        add(
            f"{big_label}: reverse sshfs, the `cat` alone",
            ex["big_sshfs_cat"],
            big,
            f"{raw.median / ex['big_sshfs_cat'].median:.2f} of raw",
        )
    else:
        add(
            f"{big_label}: topyaz-mount warm (same job again)",
            "big_warm",
            0,
            "–",
            content("big_warm"),
        )
    st = W["big_staging"]
    add(
        f"{big_label}: staging: `rsync -a` up + `ssh host cat` (end to end)",
        "big_staging",
        big,
        f"topyaz-mount cold takes {c.median / st.median:.2f}× as long",
    )
    add(
        f"{big_label}: staging, the rsync alone",
        ex["big_staging_rsync"],
        big,
        f"{raw.median / ex['big_staging_rsync'].median:.2f} of raw",
    )

    # small inputs
    sc, sw = W["small_cold"], W["small_warm"]
    small_vs_link = bl.mbps(small_total, sc.median) / nominal
    small_vs_raw = bl.mbps(small_total, sc.median) / raw_mb
    add(
        f"{small_label}: topyaz-mount cold (batch job naming the directory)",
        "small_cold",
        small_total,
        f"{small_vs_link:.2f} of the link ({nominal:.0f} MB/s); {small_vs_raw:.2f} of raw",
        content("small_cold"),
        f"≥ 0.90 of the link: **{'met' if small_vs_link >= 0.9 else 'missed'}**",
    )
    have_small_sshfs = "small_sshfs" in W
    sw_sent = smed(res["small_warm"], "content_bytes_sent")
    if have_small_sshfs:
        sp_small = W["small_sshfs"].median / sw.median
        add(
            f"{small_label}: topyaz-mount warm (same job again)",
            "small_warm",
            0,
            f"{sp_small:.1f}× faster than sshfs",
            content("small_warm"),
            f"≥ 10× sshfs and 0 B: **{'met' if sp_small >= 10 and sw_sent == 0 else 'missed'}**",
        )
    else:
        add(
            f"{small_label}: topyaz-mount warm (same job again)",
            "small_warm",
            0,
            "–",
            content("small_warm"),
        )
    add(
        f"{small_label}: `rsync -a` into a new remote dir (transfer alone)",
        ex["small_rsync"],
        small_total,
        f"topyaz-mount cold takes {sc.median / ex['small_rsync'].median:.2f}× as long",
    )
    add(
        f"{small_label}: staging: `rsync -a` + the job over `ssh` (end to end)",
        "small_rsync_job",
        small_total,
        f"topyaz-mount cold takes {sc.median / W['small_rsync_job'].median:.2f}× as long",
    )
    if have_small_sshfs:
        add(
            f"{small_label}: reverse sshfs (connect, mount, job, unmount)",
            "small_sshfs",
            small_total,
            f"topyaz-mount cold takes {sc.median / W['small_sshfs'].median:.2f}× as long",
        )
        add(f"{small_label}: reverse sshfs, the job alone", ex["small_sshfs_job"], small_total, "–")

    # start-up
    su = tm_t.median / ssh_t.median
    add("start-up: `ssh host true`", "ssh_true", 0, "1.00")
    add(
        "start-up: `topyaz-mount exec -- true`",
        "tm_true",
        0,
        f"{su:.1f}× `ssh host true` (+{tm_t.median - ssh_t.median:.2f} s)",
        "–",
        f"≤ 2×: **{'met' if su <= 2 else 'missed'}**",
    )

    header = [
        "scenario",
        "median wall",
        "min–max",
        "MB/s",
        "vs baseline (same run)",
        "content sent",
        "target",
        "runs",
    ]

    anon = (
        max(
            statistics.median([r.anon_of(AGENT) for r in res[k]])
            for k in ("big_cold", "big_warm", "small_cold", "small_warm", "tm_true")
        )
        / 1024
    )
    hwm = (
        max(
            statistics.median([r.hwm_of(AGENT) for r in res[k]])
            for k in ("big_cold", "big_warm", "small_cold", "small_warm", "tm_true")
        )
        / 1024
    )
    extra_trips = (ssh_t.median - direct_t.median) / rtt
    proxy_cpu = max(
        (statistics.median([r.helper_cpu for r in v]) / statistics.median([r.wall for r in v]))
        for k, v in res.items()
        if k in ("big_raw", "big_cold")
    )
    log = read_link_log(wb.proxy_log)
    rate_b = args.wan_rate_mbit * 1e6 / 8
    use_rows = []
    wb.link = {}
    for key, label in (
        ("big_raw", f"{big_label}: raw pipe"),
        ("big_cold", f"{big_label}: topyaz-mount cold"),
        ("big_sshfs", f"{big_label}: reverse sshfs"),
        ("big_staging", f"{big_label}: staging (rsync + ssh cat)"),
        ("small_cold", f"{small_label}: topyaz-mount cold"),
        ("small_rsync_job", f"{small_label}: rsync + the job over ssh"),
        ("small_sshfs", f"{small_label}: reverse sshfs"),
    ):
        uses = [u for r in res.get(key, []) if (u := link_use(log, r, rate_b))]
        if not uses:
            continue
        m = {k: statistics.median([u[k] for u in uses]) for k in uses[0]}
        wb.link[key] = m
        use_rows.append(
            [
                label,
                f"{m['wall']:.2f} s",
                f"{m['before']:.2f} s",
                f"{m['busy']:.1f} s",
                f"{m['gaps']:.1f} s",
                f"{m['after']:.2f} s",
                f"{100 * m['busy'] / m['wall']:.0f}%",
            ]
        )
    lines = [
        "<!-- bench:wan:start -->",
        "",
        f"## WAN: through an emulated {args.wan_rate_mbit:g} Mbit/s, "
        f"{2 * args.wan_delay_ms:g} ms RTT link ({env.date()})",
        "",
        f"Written by `{env.command}` (this section took {elapsed:.0f} s). Same machine, test "
        f"host and snapshot as the foundation section (commit {env.source_desc}). Load "
        f"average before / after: {load_before} / {bl.loadavg()}.",
        "",
        "### What was measured",
        "",
        f"* **The link**: `tools/wanproxy.py` (a userspace TCP relay on 127.0.0.1; the kernel "
        f"has no netem) in front of the test host's sshd: {args.wan_delay_ms:g} ms one-way "
        f"delay and {args.wan_rate_mbit:g} Mbit/s ({nominal:.0f} MB/s) per direction, paced "
        f"like a link's serialization (no bursts), at most 1 MiB queued per connection and "
        f"direction, the TCP handshake as one extra round trip. Every run of this section "
        f"connects through it: ssh, topyaz-mount's ssh, rsync's `-e ssh`, sshfs's ssh. It "
        f"emulates no slow start and no loss.",
        f"* **Inputs**: `big.bin`, {big_label} (a 64 MiB urandom block repeated), and "
        f"`small/`, {small_label} random files, in a client directory of mode 0700. "
        f"topyaz-mount **cold**: new bytes at the start of each input, so the remote store "
        f"lacks them; **warm**: the same job again at once (the client's index and the "
        f"remote store both have them).",
        f"* **Jobs**: big: `sh -c '{BIG_CMD}'`; small: `python3 -c '<read every file of "
        f"argv[1], sorted>' small` (names the directory, so topyaz-mount's manifest lists "
        f"the inputs). The same commands for sshfs (on its mountpoint) and for staging "
        f"(on the rsynced copy).",
        "* **Baselines**: raw pipe `ssh host 'cat > /dev/null' < big.bin`; reverse sshfs "
        "(`sshfs -o passive` on the remote fed by a local sftp-server through the same ssh "
        "link, as in the foundation section); `rsync -a -e 'ssh -F cfg -p PROXYPORT'` into "
        "a new remote temp dir, then the job over `ssh`.",
        f"* {n} run(s) of each, interleaved (the order reversed every other round); wall "
        f"clock from process start to exit with everything included (connection set-up, "
        f"mount, unmount). MB = 10^6 bytes. Medians; ratios between medians of this run."
        + (" Fewer runs than elsewhere to keep the section near 6 minutes." if n < 3 else ""),
        "",
        "### The emulated link, checked",
        "",
        *bl.md_table(
            ["check", "median", "min–max", "runs"],
            [
                [
                    "`ssh host true` without the proxy",
                    f"{direct_t.median:.3f} s",
                    f"{direct_t.min:.3f}–{direct_t.max:.3f} s",
                    str(direct_t.n),
                ],
                [
                    "`ssh host true` through the proxy",
                    f"{ssh_t.median:.3f} s",
                    f"{ssh_t.min:.3f}–{ssh_t.max:.3f} s",
                    str(ssh_t.n),
                ],
                [
                    f"raw pipe {big_label} through the proxy",
                    f"{raw_mb:.1f} MB/s",
                    f"{bl.mbps(big, raw.max):.1f}–{bl.mbps(big, raw.min):.1f} MB/s",
                    str(raw.n),
                ],
            ],
        ),
        "",
        f"The proxy adds {ssh_t.median - direct_t.median:.3f} s to `ssh host true`, "
        f"{extra_trips:.1f} × the {1000 * rtt:.0f} ms RTT (the TCP handshake, version "
        f"exchange, key exchange, authentication and the session's requests; the two-delay "
        f"fit under Interpretation separates the round trips from the relay's own cost), "
        f"and the raw pipe runs at "
        f"{100 * raw_mb / nominal:.0f}% of the nominal {nominal:.0f} MB/s (ssh's connection "
        f"set-up is inside the wall time). The proxy itself used at most "
        f"{100 * proxy_cpu:.0f}% of a core.",
        "",
        "### Results",
        "",
        *bl.md_table(header, rows),
        "",
        *(
            [
                f"Where the wall clock went on the client → remote link (the proxy logs the "
                f"bytes it puts on the link every {LOG_INTERVAL:g} s; a {LOG_INTERVAL:g} s "
                f"interval counts as busy at ≥ half the link's rate; medians):",
                "",
                *bl.md_table(
                    [
                        "run",
                        "wall",
                        "link idle before the first busy interval",
                        "busy",
                        "not busy in between",
                        "after the last busy interval",
                        "busy share of the wall clock",
                    ],
                    use_rows,
                ),
                "",
            ]
            if use_rows
            else []
        ),
        f"Agent peak RSS (VmHWM, median per kind of topyaz-mount run, the largest): "
        f"{hwm:.0f} MiB (target ≤ 150 MB: **{'met' if hwm * 1.048576 <= 150 else 'missed'}**), "
        f"of which private memory (RssAnon) at most {anon:.0f} MiB; the rest is file pages "
        f"it maps while hashing.",
        "",
    ]
    if warm_sent or sw_sent:
        ok = False
        lines += [
            f"A warm run sent content: {bl.mib(warm_sent)} (big), {bl.mib(sw_sent)} (small).",
            "",
        ]
    if counts:
        kinds = sorted({k for c in counts.values() for k in c})
        lines += [
            f"Requests the client served in one more (untimed) cold and warm {small_label} "
            "run through the proxy, counted by type by a wrapper around the client; each one "
            "the agent waits for costs at least a round trip:",
            "",
            *bl.md_table(
                ["run", *(f"`{k}`" for k in kinds)],
                [
                    [label, *(str(counts.get(key, {}).get(k, 0)) for k in kinds)]
                    for key, label in (("small_cold", "cold"), ("small_warm", "warm"))
                ],
            ),
            "",
        ]
    waited = wb.bench.quiet_waited
    lines += [
        f"Each run started on an idle machine ({waited:.0f} s of waiting in all); "
        f"{len(wb.bench.discarded)} run(s) disturbed by other load were discarded and "
        f"repeated"
        + (f", {len(wb.bench.disturbed)} kept disturbed" if wb.bench.disturbed else "")
        + " (the proxy's own CPU is not counted as disturbance).",
        "",
        "### Interpretation",
        "",
        *interpretation(env, wb, counts, rtt, nominal, raw_mb),
    ]
    if prof:
        lines += [
            "",
            f"### Profile (py-spy, one extra warm {small_label} run through the proxy)",
            "",
        ]
        for side in ("agent", "client"):
            if side not in prof or prof[side]["self"][0] < 20:
                continue
            total, top = prof[side]["self"]
            lines += [f"{side} ({total} non-idle samples in {prof['wall']:.1f} s, self time):", ""]
            lines += [f"* {pct:.0f}% `{frame}`" for pct, frame in top[:6]]
            lines.append("")
    notes = [env.store_note, *wb.notes]
    lines += ["", "Notes:", "", *(f"* {x}" for x in notes), "", "<!-- bench:wan:end -->"]
    md = "\n".join(lines) + "\n"
    return md, bl.text_table(header, rows), ok


def interpretation(env, wb: WanBench, counts, rtt, nominal, raw_mb) -> list[str]:
    res, ex = wb.res, wb.extra
    W = {k: walls(v) for k, v in res.items()}
    big, count, small_total = wb.big, wb.count, wb.small_bytes
    big_label = f"{big >> 20} MiB"
    small_label = f"{count} × {small_total // max(count, 1) >> 10} KiB"
    tm0, ssh0 = W["tm_true"].median, W["ssh_true"].median
    raw, c, w = W["big_raw"].median, W["big_cold"].median, W["big_warm"].median
    sc, sw = W["small_cold"].median, W["small_warm"].median

    def agent_load(key: str) -> float:
        return statistics.median([r.cpu_of(AGENT) / r.wall for r in res[key]])

    out = []
    behind = c - raw
    startup_extra = tm0 - ssh0
    text = (
        f"* One big input: the raw pipe moves {big_label} in {raw:.2f} s ({raw_mb:.1f} MB/s); "
        f"topyaz-mount cold takes {c:.2f} s, **{100 * raw / c:.0f}% of the raw pipe's rate** "
        f"(target ≥ 95%). It is {behind:.2f} s behind, and its start-up alone is "
        f"{startup_extra:.2f} s longer than ssh's ({tm0:.2f} s against {ssh0:.2f} s for "
        f"`true`)"
    )
    net_tm = bl.mbps(big, max(c - tm0, 1e-9))
    net_raw = bl.mbps(big, max(raw - ssh0, 1e-9))
    text += (
        f". Net of each one's `true` start-up the bytes move at {net_tm:.1f} MB/s through "
        f"topyaz-mount and {net_raw:.1f} MB/s through the raw pipe"
        + (
            ": the transfer itself runs at the link's rate, and the gap is start-up."
            if net_tm >= 0.95 * net_raw
            else "."
        )
    )
    text += (
        f" The agent is far from CPU-bound here (it used {100 * agent_load('big_cold'):.0f}% "
        f"of a core on average)."
    )
    text += link_sentence(wb, "big_cold", "big_raw", "the raw pipe")
    out.append(text)
    if "big_sshfs" in W:
        s_ = W["big_sshfs"].median
        out.append(
            f"* The same job again (warm): {w:.2f} s with "
            f"{bl.mib(smed(res['big_warm'], 'content_bytes_sent'))} of content sent, "
            f"**{s_ / w:.1f}× faster than reverse sshfs** ({s_:.2f} s; target ≥ 10×) and "
            f"{raw / w:.1f}× faster than the raw pipe. What remains is start-up ({tm0:.2f} s) "
            f"and {w - tm0:.2f} s of verifying the store object and serving the job's reads "
            f"on the remote. sshfs's time grows with the input, the warm run's hardly: the "
            f"ratio is a property of the size ({big_label} here)."
        )
    st = W["big_staging"].median
    out.append(
        f"* Staging the big input instead (`rsync -a` up, then `ssh host cat`): {st:.2f} s, "
        f"of which rsync {ex['big_staging_rsync'].median:.2f} s; topyaz-mount's cold run "
        f"takes {c / st:.2f}× as long as staging. The job reads while the bytes arrive, and "
        f"there is one connection instead of two."
    )
    rs = ex["small_rsync"].median
    per_cold = (sc - tm0) / count * 1000
    text = (
        f"* {small_label} cold: {sc:.2f} s = {bl.mbps(small_total, sc):.1f} MB/s, "
        f"**{100 * bl.mbps(small_total, sc) / nominal:.0f}% of the link** (target ≥ 90%); "
        f"rsync moves the same files in {rs:.2f} s ({bl.mbps(small_total, rs):.1f} MB/s) and "
        f"staging with rsync plus the job over ssh takes {W['small_rsync_job'].median:.2f} s. "
        f"Net of start-up topyaz-mount spends {per_cold:.1f} ms per file "
        f"({per_cold / 1000 / rtt:.2f} RTTs; the bytes alone need "
        f"{1000 * small_total / count / (nominal * 1e6):.1f} ms at the link's rate)."
    )
    cc = counts.get("small_cold", {})
    if cc:
        text += f" Requests per file: {per_file(cc, count)}."
    text += link_sentence(wb, "small_cold", "small_rsync_job", "rsync + the job")
    hashed = smed(res["small_cold"], "hashed_bytes")
    if hashed:
        text += (
            f" The client hashes the inputs it has not seen for the manifest "
            f"({bl.mib(hashed)} in each cold run; the client used "
            f"{statistics.median([r.cpu_of('client (python)') for r in res['small_cold']]):.2f}"
            f" CPU-s in all) while ssh connects and the agent starts; connecting, starting "
            f"the agent and mounting make the idle start."
        )
    out.append(text)
    per_warm = (sw - tm0) / count * 1000
    text = (
        f"* {small_label} warm: {sw:.2f} s with "
        f"{bl.mib(smed(res['small_warm'], 'content_bytes_sent'))} of content; beyond "
        f"start-up {per_warm:.1f} ms per file = {per_warm / 1000 / rtt:.2f} RTTs per file."
    )
    cw = counts.get("small_warm", {})
    if cw:
        text += f" Requests per file: {per_file(cw, count)}."
    if "small_sshfs" in W:
        s_ = W["small_sshfs"].median
        text += (
            f" Reverse sshfs takes {s_:.2f} s for the same job: topyaz-mount's warm run is "
            f"**{s_ / sw:.1f}× faster** (target ≥ 10×); sshfs pays several round trips per "
            f"file ({ex['small_sshfs_job'].median / count / rtt:.1f} RTTs "
            f"per file for its job alone)."
        )
    out.append(text)
    out += startup_anatomy(env, wb, rtt)
    return out


def link_sentence(wb: WanBench, key: str, base: str, base_label: str) -> str:
    """What the proxy's log says about a run's use of the link, against a baseline."""
    link = getattr(wb, "link", {})
    m, b = link.get(key), link.get(base)
    if not m:
        return ""
    text = (
        f" On the link: idle for the first {m['before']:.2f} s, then busy for "
        f"{m['busy']:.1f} s"
        + (f" with {m['gaps']:.1f} s below half rate in between" if m["gaps"] >= 0.2 else "")
        + f", and {m['after']:.2f} s after the last busy interval"
    )
    if b:
        text += (
            f" ({base_label}: {b['before']:.2f} s idle first, {b['busy']:.1f} s busy, "
            f"{b['after']:.2f} s after)"
        )
    return text + "."


def per_file(c: dict[str, int], n: int) -> str:
    """Requests per file ('1.00 `OpenRead`'), and totals for the rare kinds."""
    kinds = ("Stat", "OpenRead", "ReadChunk", "CloseRead", "ListDir")
    each = [f"{c[k] / n:.2f} `{k}`" for k in kinds if c.get(k, 0) >= 0.1 * n]
    rare = [f"{c[k]} `{k}`" for k in kinds if 0 < c.get(k, 0) < 0.1 * n]
    text = ", ".join(each) if each else "no `OpenRead`, `ReadChunk` or `CloseRead`"
    return text + (f" (and {', '.join(rare)} in all)" if rare else "")


def startup_anatomy(env, wb: WanBench, rtt: float) -> list[str]:
    """Round trips and fixed cost of each start-up, from two delays."""
    if "tm_true_slow" not in wb.res:
        return []
    W = {k: walls(v) for k, v in wb.res.items()}
    rtt2 = 2 * wb.slow_delay
    out = []
    fixed = {}
    trips = {}
    for name, fast, slow in (
        ("ssh", "ssh_true", "ssh_true_slow"),
        ("tm", "tm_true", "tm_true_slow"),
    ):
        trips[name] = (W[slow].median - W[fast].median) / (rtt2 - rtt)
        fixed[name] = W[fast].median - trips[name] * rtt
    py_a = min(wb.extra["py_agent"].values)
    py_c = min(wb.extra["py_client"].values)
    out.append(
        f"* Start-up anatomy: at {1000 * rtt2:.0f} ms RTT (a second proxy) `ssh host true` "
        f"takes {W['ssh_true_slow'].median:.2f} s and `exec -- true` "
        f"{W['tm_true_slow'].median:.2f} s. From the two delays: ssh costs "
        f"{trips['ssh']:.1f} round trips plus {fixed['ssh']:.2f} s, topyaz-mount "
        f"{trips['tm']:.1f} round trips plus {fixed['tm']:.2f} s. So the protocol adds "
        f"{trips['tm'] - trips['ssh']:.1f} round trips to ssh's, and "
        f"{fixed['tm'] - fixed['ssh']:.2f} s that no link shortens, of which Python start-up "
        f"and imports are {py_c:.2f} s on the client (`--version`) and {py_a:.2f} s for the "
        f"agent's modules (measured alone, best of 3); the rest is the FUSE mount and "
        f"unmount and the agent's set-up. At {1000 * rtt:.0f} ms RTT `exec -- true` is "
        f"{W['tm_true'].median / W['ssh_true'].median:.1f}× `ssh host true` (target ≤ 2×)"
        + (
            f"; as the RTT grows the ratio tends to {trips['tm'] / trips['ssh']:.1f}×, the "
            f"ratio of round trips, so the round trips alone already miss the target."
            if trips["tm"] / trips["ssh"] > 2
            else f"; as the RTT grows it tends to {trips['tm'] / trips['ssh']:.1f}×, so here "
            f"it is the fixed part that misses the target."
        )
    )
    return out
