"""The ``batch`` section of tools/bench: jobs that read inputs AND write outputs.

Two scenarios, each on loopback and through tools/wanproxy.py (the emulated link of the
``wan`` section: ``--wan-delay-ms`` each way, ``--wan-rate-mbit`` per direction), each
against baselines from the same run on the same data:

* **big in, big out**: one big input (1 GiB on loopback, 256 MiB through the WAN) read
  by a stand-in job that writes a same-size output, ``sh -c 'cat "$1" > out.bin' job
  big.bin`` (the input named on the command line, as a real tool's). Baselines: the raw
  ssh pipe, input up and a same-size remote file down through ONE connection
  (``ssh host 'cat > /dev/null && cat COPY' < big.bin > /dev/null``, the remote stamping
  the moment the upload ended, so up and down are also reported apart); staging
  (``rsync -a`` the input up into a new remote dir, the same ``cat`` over ssh, ``rsync
  -a`` the output back); reverse sshfs (the remote ``cat`` reads and writes through an
  ``sshfs -o passive`` mount of the client directory, as in the foundation section).
  The output's blake3 is checked against the input's after every topyaz-mount run.
* **photo batch** (issue scenario 4): N inputs in ``in/`` (50 x 20 MiB on loopback,
  20 x 8 MiB through the WAN); a Python stand-in job (``PHOTO_JOB``) that for each file
  in sorted order reads it whole, sleeps a fixed compute time C, and writes the first
  half of its bytes to ``out/``. The job names ``in`` on the command line, so the
  client's manifest lists the files and the agent prefetches them while the job
  computes. Figures: total compute N x C; total transfer: the raw ssh pipe moving the
  same bytes (the inputs concatenated up, then a remote file of the outputs' total size
  down, one connection); staging (rsync up, the job over ssh, rsync back). Target: wall
  <= 1.15 x max(compute, transfer). Output sizes and bytes are checked every run.

Every topyaz-mount run is cold: new bytes at the start of every input first, so the
remote content store cannot have them. The store objects of the inputs' versions and of
the outputs (the agent keeps a copy of each committed output) are deleted after each
round. Each job prints its own start and end (and, for the photo job, the time its reads
waited) on stderr, on the clock both ends share, to split the wall clock into start-up,
job and tail; through the WAN the proxy's byte log shows when each direction was busy.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_lib as bl
import bench_wan

AGENT = "agent (python)"
CLIENT = "client (python)"
START, END = "<!-- bench:batch:start -->", "<!-- bench:batch:end -->"

# The big job: the input named as an argument (so the manifest lists it), stamps around
# the cat so the wall clock can be split.
BIG_JOB = (
    't0=$(date +%s.%N); cat "$1" > out.bin || exit 1; t1=$(date +%s.%N); '
    'echo "BENCH-JOB $t0 $t1" >&2'
)
BIG_JOB_SHOWN = "sh -c 'cat \"$1\" > out.bin' job big.bin"

# The photo batch stand-in (no single quotes: it also travels inside a remote shell line).
PHOTO_JOB = r"""
import json, os, sys, time
src, dst, compute, frac = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
t0 = time.time()
os.makedirs(dst, exist_ok=True)
made = time.time()
names = sorted(os.listdir(src))
listed = time.time()
waited = wrote = 0.0
first = None
for name in names:
    t = time.time()
    with open(os.path.join(src, name), "rb") as f:
        data = f.read()
    t1 = time.time()
    waited += t1 - t
    first = first or t1
    time.sleep(compute)
    t2 = time.time()
    with open(os.path.join(dst, name), "wb") as f:
        f.write(memoryview(data)[: int(len(data) * frac)])
    wrote += time.time() - t2
print("BENCH-PHOTO " + json.dumps({"start": t0, "end": time.time(), "first": first,
      "made": made, "listed": listed, "read": waited, "write": wrote}), file=sys.stderr)
"""


def add_arguments(ap) -> None:
    g = ap.add_argument_group("batch section")
    g.add_argument("--batch-runs", type=int, default=None, help="runs of each (3; --quick 1)")
    g.add_argument(
        "--batch-links",
        choices=("both", "loopback", "wan"),
        default="both",
        help="where to measure (default both)",
    )
    g.add_argument("--batch-big-mib", type=int, default=None, help="loopback (1024; quick 256)")
    g.add_argument("--batch-wan-big-mib", type=int, default=None, help="WAN (256; quick 64)")
    g.add_argument("--batch-photos", type=int, default=None, help="loopback files (50; quick 12)")
    g.add_argument("--batch-photo-mib", type=int, default=None, help="loopback size (20; 10)")
    g.add_argument("--batch-compute-s", type=float, default=0.1, help="loopback C (0.1)")
    g.add_argument("--batch-wan-photos", type=int, default=None, help="WAN files (20; quick 8)")
    g.add_argument("--batch-wan-photo-mib", type=int, default=None, help="WAN size (8; 4)")
    g.add_argument("--batch-wan-compute-s", type=float, default=0.3, help="WAN C (0.3)")
    g.add_argument("--batch-out-fraction", type=float, default=0.5, help="output/input (0.5)")
    g.add_argument("--batch-no-sshfs", action="store_true", help="skip sshfs (big scenario)")


# --------------------------------------------------------------------------- set-up


def make_root(big: int, count: int, each: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="topyaz-bench-batch-"))
    os.chmod(root, 0o700)
    bl.write_random_file(root / "big.bin", big)
    (root / "in").mkdir()
    for i in range(count):
        bl.write_random_file(root / "in" / f"img{i:04d}.raw", each)
    return root


def stamp_line(res: bl.RunResult, tag: str) -> list[str]:
    m = re.search(rf"^{tag} (.*)$", res.stderr, re.M)
    return m.group(1).split() if m else []


class LinkBench:
    """Both scenarios on one link (loopback, or through a proxy)."""

    def __init__(self, env, name: str, root: Path, params: dict, port=None, proxy=None):
        self.env = env
        self.name = name  # "loopback" or "WAN"
        self.root = root
        self.p = params
        self.big = (root / "big.bin").stat().st_size
        self.inputs = sorted((root / "in").iterdir())
        self.in_bytes = sum(x.stat().st_size for x in self.inputs)
        self.out_sizes = {x.name: int(x.stat().st_size * params["frac"]) for x in self.inputs}
        self.out_bytes = sum(self.out_sizes.values())
        self.bench = env.make_bench(root, self.big, port=port, sync_before=True)
        self.proxy = proxy
        if proxy is not None:
            self.bench.helper_cpu = lambda: bench_wan.cpu_seconds(proxy.pid)
        ssh = self.bench.ssh_argv()
        self.ssh = ssh
        self.rsync_e = shlex.join(
            [ssh[0], "-F", ssh[ssh.index("-F") + 1], "-p", ssh[ssh.index("-p") + 1]]
        )
        self.dest = ssh[-1]
        self.res: dict[str, list[bl.RunResult]] = {}
        self.info: dict[str, list[dict]] = {}
        self.digests: list[bytes] = list(self.bench.digests)
        self.notes: list[str] = []
        self.bad: list[str] = []  # failed output checks
        self.verified = {"big": 0, "photo": 0}
        self.sshfs_failed = False
        self.link: dict[str, dict] = {}
        self.rtt = 0.0  # the emulated round trip (0 on loopback)
        self.remote_dir = self._remote_files()
        # What hashing the inputs for the manifest costs the client.
        self.hash_s = bl.time_hash_fd(self.env.snap / "python", self.inputs)

    # --- helpers --------------------------------------------------------------------

    def _remote_files(self) -> Path:
        """Remote copies for the raw pipe's download direction: big.bin, and a random
        file of the photo outputs' total size, in the page cache (as root: same
        machine), under this run's private remote cache dir."""
        pw = pwd.getpwnam(self.env.host.remote_user)
        d = Path(tempfile.mkdtemp(prefix="batch-", dir=self.env.remote_cache))
        shutil.copyfile(self.root / "big.bin", d / "big.bin")
        bl.write_random_file(d / "outputs.bin", self.out_bytes)
        for x in (d, d / "big.bin", d / "outputs.bin"):
            os.chown(x, pw.pw_uid, pw.pw_gid)
        return d

    def staged(self, upload: str, job: str, fetch: str) -> tuple[bl.RunResult, dict]:
        """The staging baseline: rsync ``upload`` up, run ``job`` there over ssh, rsync
        ``fetch`` back into staged/; the run and its three phases' times."""
        (self.root / "staged").mkdir()
        tmp = bl.remote_tmp(self.env, "stage")
        script = (
            't0=$(date +%s.%N); rsync -a -e "$RSH" "$UP" "$DEST:$TMP/" || exit 1; '
            't1=$(date +%s.%N); "$@" "$JOB" || exit 1; t2=$(date +%s.%N); '
            'rsync -a -e "$RSH" "$DEST:$TMP/$BACK" staged/ || exit 1; '
            't3=$(date +%s.%N); echo "BENCH-T $t0 $t1 $t2 $t3" >&2'
        )
        env = dict(
            self.bench.tm_env,
            RSH=self.rsync_e,
            DEST=self.dest,
            TMP=tmp,
            UP=upload,
            BACK=fetch,
            JOB=f"cd {shlex.quote(tmp)} && {job}",
        )
        try:
            res = self.timed(["sh", "-c", script, "sh", *self.ssh], env=env)
        finally:
            bl.drop_remote(self.env, tmp)
        t = [float(x) for x in stamp_line(res, "BENCH-T")]
        return res, {"up": t[1] - t[0], "job": t[2] - t[1], "down": t[3] - t[2]}

    def timed(self, argv: list[str], **kw) -> bl.RunResult:
        kw.setdefault("env", self.bench.tm_env)
        return bl.timed_run(argv, remote_root=self.env.host.pid, cwd=str(self.root), **kw)

    def add(self, key: str, res: bl.RunResult, info: dict | None = None) -> None:
        self.res.setdefault(key, []).append(res)
        self.info.setdefault(key, []).append(info or {})

    def clean_outputs(self) -> None:
        for name in ("out.bin", "out-sshfs.bin"):
            (self.root / name).unlink(missing_ok=True)
        for name in ("out", "staged"):
            shutil.rmtree(self.root / name, ignore_errors=True)

    def drop_objects(self) -> None:
        bl.remove_objects(self.env.store_dir, self.digests)
        self.digests = []

    @staticmethod
    def rel(res: bl.RunResult, epoch: float) -> float:
        """An epoch stamp as seconds after the run's spawn."""
        return epoch - (res.mono_start + (time.time() - time.monotonic()))

    # --- start-up ---------------------------------------------------------------------

    def startup(self) -> None:
        b = self.bench
        self.add("ssh_true", b.run([*b.ssh_argv(), "true"], label=f"{self.name} ssh true"))
        self.add("tm_true", b.run([*b.tm_argv(), "--", "true"], label=f"{self.name} exec true"))

    # --- big in, big out --------------------------------------------------------------

    def big_raw(self) -> None:
        cmd = (
            "cat > /dev/null && echo BENCH-UP $(date +%s.%N) >&2 && "
            f"cat {shlex.quote(str(self.remote_dir / 'big.bin'))}"
        )

        def once():
            res = self.timed([*self.ssh, cmd], stdin_path=str(self.root / "big.bin"))
            up = self.rel(res, float(stamp_line(res, "BENCH-UP")[0]))
            return res, {"up": up, "down": res.wall - up}

        res, info = self.bench.measure(f"{self.name} big raw", once)
        self.add("big_raw", res, info)

    def big_echo(self) -> None:
        """The raw pipe with both directions at once: the remote ``cat`` echoes the input
        back as it arrives (what a streaming job could do at best over one link)."""
        self.add(
            "big_echo",
            self.bench.measure(
                f"{self.name} big echo",
                lambda: self.timed([*self.ssh, "cat"], stdin_path=str(self.root / "big.bin")),
            ),
        )

    def big_tm(self) -> None:
        argv = [*self.bench.tm_argv(), "--", "sh", "-c", BIG_JOB, "job", "big.bin"]

        def once():
            self.clean_outputs()
            digest = bl.freshen(self.root / "big.bin")
            self.digests.append(digest)
            res = self.timed(argv)
            t = [self.rel(res, float(x)) for x in stamp_line(res, "BENCH-JOB")]
            out = self.root / "out.bin"
            if not out.exists() or bl.blake3_file(out) != digest:
                self.bad.append(f"{self.name} big: out.bin differs from big.bin")
            else:
                self.verified["big"] += 1
            info = {"job_start": t[0], "job_end": t[1]} if t else {}
            return res, info | self.stats_info(res, self.big, self.big)

        res, info = self.bench.measure(f"{self.name} big topyaz-mount", once)
        self.add("big_tm", res, info)
        self.clean_outputs()

    def big_staging(self) -> None:
        def once():
            self.clean_outputs()
            res, info = self.staged("big.bin", "cat big.bin > out.bin", "out.bin")
            got = (self.root / "staged" / "out.bin").stat().st_size
            if got != self.big:
                raise bl.RunFailed(f"staging brought back {got} bytes, not {self.big}")
            return res, info

        res, info = self.bench.measure(f"{self.name} big staging", once)
        self.add("big_staging", res, info)
        self.clean_outputs()

    def big_sshfs(self) -> None:
        if self.sshfs_failed:
            return
        self.clean_outputs()
        try:
            res, job = self.bench.read_sshfs(
                'cat "$m/big.bin" > "$m/out-sshfs.bin"', label=f"{self.name} big sshfs"
            )
        except bl.RunFailed as e:
            self.sshfs_failed = True
            self.notes.append(f"sshfs baseline skipped on {self.name}: {e}")
            return
        got = (self.root / "out-sshfs.bin").stat().st_size
        if got != self.big:
            self.notes.append(f"sshfs wrote {got} bytes, not {self.big}")
        self.add("big_sshfs", res, {"job": job})
        self.clean_outputs()

    # --- photo batch ------------------------------------------------------------------

    def photo_args(self) -> list[str]:
        return ["in", "out", f"{self.p['compute']:g}", f"{self.p['frac']:g}"]

    def photo_raw(self) -> None:
        cmd = (
            "cat > /dev/null && echo BENCH-UP $(date +%s.%N) >&2 && "
            f"cat {shlex.quote(str(self.remote_dir / 'outputs.bin'))}"
        )
        script = 'cat in/* | "$@" "$CMD"'

        def once():
            env = dict(self.bench.tm_env, CMD=cmd)
            res = self.timed(["sh", "-c", script, "sh", *self.ssh], env=env)
            up = self.rel(res, float(stamp_line(res, "BENCH-UP")[0]))
            return res, {"up": up, "down": res.wall - up}

        res, info = self.bench.measure(f"{self.name} photo raw", once)
        self.add("photo_raw", res, info)

    def check_photo_outputs(self, out_dir: Path, digests: bool) -> str:
        """'' if every output has the right size and bytes (the input's first part)."""
        for src in self.inputs:
            out = out_dir / src.name
            want = self.out_sizes[src.name]
            if not out.exists():
                return f"{out.name} missing"
            if out.stat().st_size != want:
                return f"{out.name}: {out.stat().st_size} bytes, not {want}"
            with open(src, "rb") as a, open(out, "rb") as b:
                if a.read(want) != b.read():
                    return f"{out.name}: bytes differ from the input's first {want}"
            if digests:
                self.digests.append(bl.blake3_file(out))
        return ""

    def photo_tm(self) -> None:
        argv = [*self.bench.tm_argv(), "--", "python3", "-c", PHOTO_JOB, *self.photo_args()]

        def once():
            self.clean_outputs()
            for path in self.inputs:
                self.digests.append(bl.freshen(path))
            res = self.timed(argv)
            bad = self.check_photo_outputs(self.root / "out", digests=True)
            if bad:
                self.bad.append(f"{self.name} photo batch: {bad}")
            else:
                self.verified["photo"] += 1
            return res, self.photo_info(res) | self.stats_info(res, self.in_bytes, self.out_bytes)

        res, info = self.bench.measure(f"{self.name} photo topyaz-mount", once)
        self.add("photo_tm", res, info)
        self.clean_outputs()

    def stats_info(self, res: bl.RunResult, sent: int, received: int) -> dict:
        """Content moved, from ``--stats=json``; a cold run must send every input byte
        (else a cache had them and the run was not cold) and receive every output."""
        st = res.stats or {}
        out = {
            k: float(st[k])
            for k in ("content_bytes_sent", "content_bytes_received", "hashed_bytes")
            if k in st
        }
        if st and (
            out.get("content_bytes_sent") != sent or out.get("content_bytes_received") != received
        ):
            self.notes.append(
                f"a {self.name} topyaz-mount run moved {bl.mib(out.get('content_bytes_sent', 0))}"
                f" up and {bl.mib(out.get('content_bytes_received', 0))} down, expected "
                f"{bl.mib(sent)} and {bl.mib(received)}"
            )
        return out

    def photo_info(self, res: bl.RunResult) -> dict:
        m = re.search(r"^BENCH-PHOTO (.*)$", res.stderr, re.M)
        if not m:
            return {}
        d = json.loads(m.group(1))
        return {
            "job_start": self.rel(res, d["start"]),
            "job_end": self.rel(res, d["end"]),
            "first": self.rel(res, d["first"]) if d["first"] else 0.0,
            "setup": d["listed"] - d["start"],
            "mkdir": d["made"] - d["start"],
            "read": d["read"],
            "write": d["write"],
        }

    def photo_staging(self) -> None:
        def once():
            self.clean_outputs()
            job = shlex.join(["python3", "-c", PHOTO_JOB, *self.photo_args()])
            res, info = self.staged("in", job, "out")
            bad = self.check_photo_outputs(self.root / "staged" / "out", digests=False)
            if bad:
                raise bl.RunFailed(f"staging outputs: {bad}")
            return res, info

        res, info = self.bench.measure(f"{self.name} photo staging", once)
        self.add("photo_staging", res, info)
        self.clean_outputs()

    # --- rounds -----------------------------------------------------------------------

    def rounds(self, n: int, with_sshfs: bool) -> None:
        say = self.env.say
        b = self.bench
        b.run([*b.ssh_argv(), "true"])  # unrecorded warm-ups
        b.run([*b.tm_argv(), "--", "true"])
        big = [self.big_raw, self.big_tm, self.big_echo, self.big_staging] + (
            [self.big_sshfs] if with_sshfs else []
        )
        photo = [self.photo_raw, self.photo_tm, self.photo_staging]
        for i in range(n):
            self.startup()
            for steps in (big, photo):
                k = i % len(steps)
                for step in steps[k:] + steps[:k]:
                    step()
                    key = step.__name__
                    say(f"batch {self.name} {i + 1}/{n} {key}: {self.res[key][-1].wall:.2f} s")
            self.drop_objects()


# --------------------------------------------------------------------------- link log


def read_log(path: Path) -> list[tuple[float, int, int]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    return [
        (float(m.group(1)), int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^t=(\S+) up_bytes=(\d+) down_bytes=(\d+)", text, re.M)
    ]


def link_profile(log, res: bl.RunResult, rate: float) -> dict | None:
    """Seconds each direction was busy (an interval at >= half the link's rate), both at
    once, and the link idle before the first / after the last busy interval."""
    lo, hi = res.mono_start - bench_wan.LOG_INTERVAL, res.mono_end + 0.05
    pts = [p for p in log if lo <= p[0] <= hi]
    if len(pts) < 2:
        return None
    up = down = both = 0.0
    spans: dict[str, list[float]] = {"up": [], "down": []}
    for (t0, u0, d0), (t1, u1, d1) in zip(pts, pts[1:], strict=False):
        dt = max(t1 - t0, 1e-9)
        bu, bd = (u1 - u0) / dt >= 0.5 * rate, (d1 - d0) / dt >= 0.5 * rate
        up += dt * bu
        down += dt * bd
        both += dt * (bu and bd)
        for name, busy in (("up", bu), ("down", bd)):
            if busy:
                spans[name] += [t0 - res.mono_start, t1 - res.mono_start]
    wall = res.mono_end - res.mono_start
    out = {"wall": wall, "up": up, "down": down, "both": both}
    for name, ts in spans.items():
        out[f"{name}_first"] = max(min(ts), 0.0) if ts else float("nan")
        out[f"{name}_last"] = min(max(ts), wall) if ts else float("nan")
    ends = [max(ts) for ts in spans.values() if ts]
    starts = [min(ts) for ts in spans.values() if ts]
    out["before"] = max(min(starts), 0.0) if starts else wall
    out["after"] = max(wall - max(ends), 0.0) if ends else 0.0
    return out


def crossed(log, res: bl.RunResult, t: float) -> tuple[float, float, float, float]:
    """Bytes of a run that had crossed up / down by monotonic ``t``, and the run's totals."""
    lo, hi = res.mono_start - bench_wan.LOG_INTERVAL, res.mono_end + 0.2
    pts = [p for p in log if lo <= p[0] <= hi]
    if len(pts) < 2:
        return (float("nan"),) * 4
    before = [p for p in pts if p[0] <= t] or pts[:1]
    first, last, at = pts[0], pts[-1], before[-1]
    return at[1] - first[1], at[2] - first[2], last[1] - first[1], last[2] - first[2]


# --------------------------------------------------------------------------- run


def params(args, link: str) -> dict:
    q = args.quick
    if link == "loopback":
        return {
            "big": (args.batch_big_mib or (256 if q else 1024)) << 20,
            "count": args.batch_photos or (12 if q else 50),
            "each": (args.batch_photo_mib or (10 if q else 20)) << 20,
            "compute": args.batch_compute_s,
            "frac": args.batch_out_fraction,
        }
    return {
        "big": (args.batch_wan_big_mib or (64 if q else 256)) << 20,
        "count": args.batch_wan_photos or (8 if q else 20),
        "each": (args.batch_wan_photo_mib or (4 if q else 8)) << 20,
        "compute": args.batch_wan_compute_s,
        "frac": args.batch_out_fraction,
    }


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    n = args.batch_runs or (1 if args.quick else 3)
    links = ["loopback", "WAN"] if args.batch_links == "both" else [args.batch_links]
    links = ["WAN" if x == "wan" else x for x in links]
    with_sshfs = env.with_sshfs and not args.batch_no_sshfs
    t0 = time.perf_counter()
    load_before = bl.loadavg()
    done: list[LinkBench] = []
    for link in links:
        with on_link(env, link, LinkBench, "batch") as lb:
            lb.rounds(n, with_sshfs)
            if lb.proxy is not None:
                log = read_log(env.workdir / "wanproxy-batch.log")
                rate = args.wan_rate_mbit * 1e6 / 8
                for key in ("big_tm", "photo_tm"):
                    for r, info in zip(lb.res[key], lb.info[key], strict=True):
                        if "job_end" in info:
                            _, down, _, total = crossed(log, r, r.mono_start + info["job_end"])
                            info["down_at_end"] = down / total if total else float("nan")
                            up, *_ = crossed(log, r, r.mono_start + info["job_start"])
                            info["up_at_start"] = up
                for key, rs in lb.res.items():
                    profs = [x for r in rs if (x := link_profile(log, r, rate))]
                    if profs:
                        lb.link[key] = {k: statistics.median(x[k] for x in profs) for k in profs[0]}
            done.append(lb)
    return report(env, done, n, with_sshfs, time.perf_counter() - t0, load_before)


@contextlib.contextmanager
def on_link(env, link: str, cls, section: str):
    """A ``cls`` (a LinkBench) on ``link`` ("loopback" or "WAN"), with its inputs made
    and, for the WAN, a proxy logging to ``wanproxy-SECTION.log``; all removed after."""
    args = env.args
    p = params(args, link)
    env.say(
        f"{section} {link}: writing a {p['big'] >> 20} MiB file and {p['count']} x "
        f"{p['each'] >> 20} MiB inputs"
    )
    root = make_root(p["big"], p["count"], p["each"])
    proxy = None
    lb = None
    try:
        port = None
        if link == "WAN":
            proxy, port = bench_wan.start_proxy(
                env.host.port,
                args.wan_delay_ms,
                args.wan_rate_mbit,
                env.workdir / f"wanproxy-{section}.log",
            )
            env.say(f"{section}: proxy pid {proxy.pid} on 127.0.0.1:{port}")
        lb = cls(env, link, root, p, port=port, proxy=proxy)
        if proxy is not None:
            lb.rtt = 2 * args.wan_delay_ms / 1000
        yield lb
    finally:
        if lb is not None:
            lb.drop_objects()
            shutil.rmtree(lb.remote_dir, ignore_errors=True)
        if proxy is not None:
            bench_wan.stop_proxy(proxy)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- report


def walls(rs) -> bl.Series:
    return bl.Series([r.wall for r in rs])


def imed(lb: LinkBench, key: str, field: str) -> float:
    vals = [i[field] for i in lb.info.get(key, []) if field in i]
    return statistics.median(vals) if vals else float("nan")


def smed(rs, key: str) -> float:
    return statistics.median([float((r.stats or {}).get(key, 0)) for r in rs])


def cell(s: bl.Series) -> str:
    return f"{s.median:.2f} s ({s.min:.2f}–{s.max:.2f})"


def size_label(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n % (1 << 30) == 0 else f"{n >> 20} MiB"


def report(env, lbs: list[LinkBench], n: int, with_sshfs: bool, elapsed, load_before):
    args = env.args
    ok = all(not lb.bad for lb in lbs)
    cols = [f"{lb.name}, {size_label(lb.big)}" for lb in lbs]

    # --- table 1: big in, big out
    rows1: list[list[str]] = []

    def row(label, fn):
        rows1.append([label, *(fn(lb) for lb in lbs)])

    row("raw pipe, up + down (one connection)", lambda lb: cell(walls(lb.res["big_raw"])))
    row(
        "… of which up / down",
        lambda lb: f"{imed(lb, 'big_raw', 'up'):.2f} s / {imed(lb, 'big_raw', 'down'):.2f} s",
    )
    row(
        "raw pipe, both directions at once: `ssh host cat < big.bin > /dev/null`",
        lambda lb: cell(walls(lb.res["big_echo"])),
    )
    row("**topyaz-mount** `exec`, cold", lambda lb: "**" + cell(walls(lb.res["big_tm"])) + "**")
    row(
        "… before the job started / job / after it ended",
        lambda lb: (
            f"{imed(lb, 'big_tm', 'job_start'):.2f} / "
            f"{imed(lb, 'big_tm', 'job_end') - imed(lb, 'big_tm', 'job_start'):.2f} / "
            f"{walls(lb.res['big_tm']).median - imed(lb, 'big_tm', 'job_end'):.2f} s"
        ),
    )
    row(
        "… content sent / received (`--stats`)",
        lambda lb: (
            f"{bl.mib(imed(lb, 'big_tm', 'content_bytes_sent'))} / "
            f"{bl.mib(imed(lb, 'big_tm', 'content_bytes_received'))}"
        ),
    )
    row(
        "staging: rsync up, `cat` over ssh, rsync back",
        lambda lb: cell(walls(lb.res["big_staging"])),
    )
    row(
        "… rsync up / job / rsync back",
        lambda lb: (
            f"{imed(lb, 'big_staging', 'up'):.2f} / {imed(lb, 'big_staging', 'job'):.2f}"
            f" / {imed(lb, 'big_staging', 'down'):.2f} s"
        ),
    )
    if any("big_sshfs" in lb.res for lb in lbs):
        row(
            "reverse sshfs (connect, mount, `cat` through it both ways, unmount)",
            lambda lb: cell(walls(lb.res["big_sshfs"])) if "big_sshfs" in lb.res else "–",
        )
    row(
        "`ssh host true` / `exec -- true`",
        lambda lb: (
            f"{walls(lb.res['ssh_true']).median:.2f} s / {walls(lb.res['tm_true']).median:.2f} s"
        ),
    )

    def ratio(lb, a, b):
        return walls(lb.res[a]).median / walls(lb.res[b]).median

    row("topyaz-mount / raw (up + down)", lambda lb: f"**{ratio(lb, 'big_tm', 'big_raw'):.2f}**")
    row("topyaz-mount / raw both at once", lambda lb: f"{ratio(lb, 'big_tm', 'big_echo'):.2f}")
    row("topyaz-mount / staging", lambda lb: f"**{ratio(lb, 'big_tm', 'big_staging'):.2f}**")
    if any("big_sshfs" in lb.res for lb in lbs):
        row(
            "topyaz-mount / sshfs",
            lambda lb: f"{ratio(lb, 'big_tm', 'big_sshfs'):.2f}" if "big_sshfs" in lb.res else "–",
        )

    # --- table 2: photo batch
    rows2: list[list[str]] = []
    met: dict[str, tuple[float, bool]] = {}
    for lb in lbs:
        p = lb.p
        compute = p["count"] * p["compute"]
        raw = walls(lb.res["photo_raw"])
        bound = max(compute, raw.median)
        tm = walls(lb.res["photo_tm"])
        r = tm.median / bound
        met[lb.name] = (r, r <= 1.15)
        lb.photo = {"compute": compute, "raw": raw.median, "bound": bound, "ratio": r}

    def row2(label, fn):
        rows2.append([label, *(fn(lb) for lb in lbs)])

    row2(
        "inputs → outputs",
        lambda lb: (
            f"{lb.p['count']} × {lb.p['each'] >> 20} MiB → {lb.p['count']} × "
            f"{bl.mib(lb.p['each'] * lb.p['frac'])}"
        ),
    )
    row2(
        "total compute N × C",
        lambda lb: f"{lb.photo['compute']:.2f} s ({lb.p['count']} × {lb.p['compute']:g} s)",
    )
    row2(
        "total transfer: raw pipe, inputs up + outputs down (one connection)",
        lambda lb: cell(walls(lb.res["photo_raw"])),
    )
    row2(
        "… of which up / down",
        lambda lb: f"{imed(lb, 'photo_raw', 'up'):.2f} s / {imed(lb, 'photo_raw', 'down'):.2f} s",
    )
    row2("**topyaz-mount** `exec`, cold", lambda lb: "**" + cell(walls(lb.res["photo_tm"])) + "**")
    row2(
        "… before the job started / job / after it ended",
        lambda lb: (
            f"{imed(lb, 'photo_tm', 'job_start'):.2f} / "
            f"{imed(lb, 'photo_tm', 'job_end') - imed(lb, 'photo_tm', 'job_start'):.2f} / "
            f"{walls(lb.res['photo_tm']).median - imed(lb, 'photo_tm', 'job_end'):.2f} s"
        ),
    )
    row2(
        "… in the job: mkdir / listing / reads waited / sleeps / writes (sums)",
        lambda lb: (
            f"{imed(lb, 'photo_tm', 'mkdir'):.2f} / "
            f"{imed(lb, 'photo_tm', 'setup') - imed(lb, 'photo_tm', 'mkdir'):.2f} / "
            f"{imed(lb, 'photo_tm', 'read'):.2f} / "
            f"{lb.photo['compute']:.2f} / {imed(lb, 'photo_tm', 'write'):.2f} s"
        ),
    )
    row2(
        "… content sent / received (`--stats`)",
        lambda lb: (
            f"{bl.mib(imed(lb, 'photo_tm', 'content_bytes_sent'))} / "
            f"{bl.mib(imed(lb, 'photo_tm', 'content_bytes_received'))}"
        ),
    )
    row2(
        "staging: rsync up, the job over ssh, rsync back",
        lambda lb: cell(walls(lb.res["photo_staging"])),
    )
    row2(
        "… rsync up / job / rsync back",
        lambda lb: (
            f"{imed(lb, 'photo_staging', 'up'):.2f} / "
            f"{imed(lb, 'photo_staging', 'job'):.2f} / {imed(lb, 'photo_staging', 'down'):.2f} s"
        ),
    )
    row2(
        "topyaz-mount / max(compute, transfer) — target ≤ 1.15",
        lambda lb: f"**{met[lb.name][0]:.2f}: {'met' if met[lb.name][1] else 'missed'}**",
    )
    row2(
        "topyaz-mount / staging",
        lambda lb: (
            f"**{walls(lb.res['photo_tm']).median / walls(lb.res['photo_staging']).median:.2f}**"
        ),
    )

    # --- link use through the WAN
    wan = next((lb for lb in lbs if lb.name == "WAN" and getattr(lb, "link", None)), None)
    link_rows = []
    if wan is not None:
        for key, label in (
            ("big_raw", f"{size_label(wan.big)}: raw pipe up + down"),
            ("big_echo", f"{size_label(wan.big)}: raw pipe both at once"),
            ("big_tm", f"{size_label(wan.big)}: topyaz-mount"),
            ("big_staging", f"{size_label(wan.big)}: staging"),
            ("big_sshfs", f"{size_label(wan.big)}: reverse sshfs"),
            ("photo_raw", "photo batch: raw pipe up + down"),
            ("photo_tm", "photo batch: topyaz-mount"),
            ("photo_staging", "photo batch: staging"),
        ):
            m = wan.link.get(key)
            if m:
                link_rows.append(
                    [
                        label,
                        f"{m['wall']:.2f} s",
                        f"{m['up']:.1f} s ({m['up_first']:.1f}–{m['up_last']:.1f})",
                        f"{m['down']:.1f} s ({m['down_first']:.1f}–{m['down_last']:.1f})",
                        f"{m['both']:.1f} s",
                        f"{m['before']:.2f} s",
                        f"{m['after']:.2f} s",
                    ]
                )

    # --- text
    discarded = sum(len(lb.bench.discarded) for lb in lbs)
    disturbed = sum(len(lb.bench.disturbed) for lb in lbs)
    waited = sum(lb.bench.quiet_waited for lb in lbs)
    nominal = args.wan_rate_mbit / 8
    h1 = ["big in, big out", *cols]
    h2 = ["photo batch", *(lb.name for lb in lbs)]
    lines = [
        START,
        "",
        f"## Batch: inputs in, outputs back ({env.date()})",
        "",
        f"Written by `{env.command}` (this section took {elapsed:.0f} s). Same machine and "
        f"test host as the foundation section; source {env.source_desc}. Load average "
        f"before / after: {load_before} / {bl.loadavg()}.",
        "",
        "### What was measured",
        "",
        f"* **Links**: loopback, and through `tools/wanproxy.py` as in the wan section "
        f"({2 * args.wan_delay_ms:g} ms RTT, {args.wan_rate_mbit:g} Mbit/s = {nominal:g} MB/s "
        f"per direction; every ssh, rsync and topyaz-mount connection of that half goes "
        f"through it).",
        f"* **Big in, big out**: `exec -- {BIG_JOB_SHOWN}` (the input named on the command "
        f"line, so the manifest lists it; the output streams back while it is written). "
        f"Raw pipe: `ssh host 'cat > /dev/null && cat COPY' < big.bin > /dev/null`, the "
        f"input up and a same-size remote file (in the remote page cache) down through "
        f"one connection, one ssh start-up; the remote stamps the end of the upload, "
        f"which splits it into up / down. It writes no file at either end, topyaz-mount "
        f"writes out.bin on both. For comparison, the raw pipe with both directions at "
        f"once: `ssh host cat < big.bin > /dev/null` (the remote `cat` echoes the input "
        f"back as it arrives: the best a streaming job could do over the link). Staging: "
        f"`rsync -a` big.bin into a new remote dir, "
        f"`ssh host 'cat big.bin > out.bin'`, `rsync -a` out.bin back into a new local "
        f"dir. Reverse sshfs: the remote `cat` reads big.bin from and writes out.bin to "
        f"an `sshfs -o passive` mount of the client directory (foundation section's set-up)"
        + ("" if with_sshfs else "; **skipped in this run**")
        + ". Every topyaz-mount run's out.bin was checked against big.bin (blake3): "
        + ", ".join(f"{lb.verified['big']} of {len(lb.res['big_tm'])} {lb.name}" for lb in lbs)
        + " identical.",
        "* **Photo batch**: N random inputs in `in/`; `exec -- python3 -c '<PHOTO_JOB>' in "
        "out C 0.5`: for each file in sorted order read it whole, `time.sleep(C)`, write "
        "its first half to `out/` (source in `tools/bench_batch.py`). `in` on the command "
        "line makes the client's manifest list the files, so the agent fetches them while "
        "the job computes. Total transfer: the raw pipe moving the same bytes, "
        "`cat in/* | ssh host 'cat > /dev/null && cat OUTPUTS'` (OUTPUTS: a remote random "
        "file of the outputs' total size), one connection, up then down. Staging: `rsync "
        "-a in` up, the same job over ssh, `rsync -a out` back. Target: topyaz-mount's "
        "wall ≤ 1.15 × max(N × C, transfer). Every topyaz-mount run's outputs were checked "
        "(size and bytes): "
        + ", ".join(f"{lb.verified['photo']} of {len(lb.res['photo_tm'])} {lb.name}" for lb in lbs)
        + " correct.",
        f"* Every topyaz-mount run is cold (16 new random bytes at the start of every "
        f"input). The jobs stamp their start and end on stderr (one clock for both ends), "
        f"which splits the wall clock. {n} run(s) of each per link, interleaved (order "
        f"rotated each round), wall clock from spawn to exit, medians (min–max). Runs "
        f"during which other processes took more than {args.max_foreign:g} cores were "
        f"repeated: {discarded} repeated, {disturbed} kept after the last retry; "
        f"{waited:.0f} s waited for an idle machine.",
        "",
        "### Results",
        "",
        *bl.md_table(h1, rows1),
        "",
        *bl.md_table(h2, rows2),
        "",
    ]
    if link_rows:
        lines += [
            "Through the WAN, when each direction was busy (≥ half the link's rate in a "
            f"{bench_wan.LOG_INTERVAL:g} s interval of the proxy's log; medians):",
            "",
            *bl.md_table(
                [
                    "run",
                    "wall",
                    "up busy (first–last, s after spawn)",
                    "down busy (first–last)",
                    "both at once",
                    "idle before the first busy interval",
                    "after the last",
                ],
                link_rows,
            ),
            "",
        ]
    if not ok:
        lines += ["**Output checks failed**: " + "; ".join(b for lb in lbs for b in lb.bad), ""]
    lines += ["### Interpretation", "", *interpretation(lbs, met)]
    notes = [n for lb in lbs for n in lb.notes]
    notes.append(env.store_note)
    notes.append(
        "the store objects of every input version and output of these runs (the agent "
        "keeps a copy of each committed output) were deleted after each round"
    )
    lines += ["", "Notes:", "", *(f"* {x}" for x in notes), "", END]
    md = "\n".join(lines) + "\n"
    table = bl.text_table(h1, rows1) + "\n\n" + bl.text_table(h2, rows2)
    return md, table, ok


def interpretation(lbs: list[LinkBench], met) -> list[str]:
    out = []
    for lb in lbs:
        W = {k: walls(v).median for k, v in lb.res.items()}
        tm, raw, st = W["big_tm"], W["big_raw"], W["big_staging"]
        start, end = imed(lb, "big_tm", "job_start"), imed(lb, "big_tm", "job_end")
        agent = statistics.median(r.cpu_of(AGENT) for r in lb.res["big_tm"])
        text = (
            f"* {lb.name}, {size_label(lb.big)} in and out: topyaz-mount {tm:.2f} s, "
            f"**{tm / raw:.2f}×** the raw pipe's up + down ({raw:.2f} s) and "
            f"**{tm / st:.2f}×** staging ({st:.2f} s); the raw pipe with both directions at "
            f"once takes {W['big_echo']:.2f} s ({tm / W['big_echo']:.2f}×). The job started "
            f"{start:.2f} s after "
            f"spawn (`exec -- true` takes {W['tm_true']:.2f} s in all), ran {end - start:.2f} "
            f"s, and {tm - end:.2f} s passed after it ended (the last output bytes, commit, "
            f"unmount, exit). The agent used {agent:.2f} CPU-s."
        )
        link = getattr(lb, "link", {})
        m = link.get("big_tm")
        if m:
            text += (
                f" On the link the upload was busy {m['up']:.1f} s "
                f"({m['up_first']:.1f}–{m['up_last']:.1f} s after spawn) and the download "
                f"{m['down']:.1f} s ({m['down_first']:.1f}–{m['down_last']:.1f} s), "
                f"{m['both']:.1f} s of it at the same time"
                + (
                    ": the output streams back while the input still arrives"
                    if m["both"] > 0.5 * min(m["up"], m["down"])
                    else f": little overlap (the job ended at {end:.1f} s, the download's "
                    f"last busy interval was at {m['down_last']:.1f} s)"
                )
                + (
                    f"; when the job ended {100 * share:.0f}% of the output had crossed"
                    if (share := imed(lb, "big_tm", "down_at_end")) == share
                    else ""
                )
                + (
                    f". The raw pipe both ways at once keeps both directions busy "
                    f"{me['both']:.1f} s at once."
                    if (me := link.get("big_echo"))
                    else "."
                )
            )
        else:
            cores = statistics.median(
                (r.local_cpu + r.remote_cpu) / r.wall for r in lb.res["big_tm"]
            )
            text += (
                f" On loopback nothing waits for a network: all processes together kept "
                f"{cores:.2f} of the {os.cpu_count()} cores busy, so this is the CPU cost of "
                f"each path."
            )
        out.append(text)
    for lb in lbs:
        ph, p = lb.photo, lb.p
        r, ok = met[lb.name]
        tm = walls(lb.res["photo_tm"]).median
        start, end = imed(lb, "photo_tm", "job_start"), imed(lb, "photo_tm", "job_end")
        first = imed(lb, "photo_tm", "first") - start - imed(lb, "photo_tm", "setup")
        read, write = imed(lb, "photo_tm", "read"), imed(lb, "photo_tm", "write")
        setup, mkdir = imed(lb, "photo_tm", "setup"), imed(lb, "photo_tm", "mkdir")
        hashed = imed(lb, "photo_tm", "hashed_bytes")
        tail = tm - end
        other = (end - start) - setup - read - write - ph["compute"]
        compute_bound = ph["compute"] >= ph["raw"]
        st = walls(lb.res["photo_staging"]).median
        per_write = 1000 * write / p["count"]
        text = (
            f"* {lb.name} photo batch ({p['count']} × {p['each'] >> 20} MiB, C = "
            f"{p['compute']:g} s): topyaz-mount {tm:.2f} s against max(compute "
            f"{ph['compute']:.2f} s, transfer {ph['raw']:.2f} s) = {ph['bound']:.2f} s "
            f"({'compute' if compute_bound else 'transfer'}-bound): **{r:.2f}×, target ≤ "
            f"1.15 {'met' if ok else 'missed'}**; staging takes {st:.2f} s, topyaz-mount "
            f"{tm / st:.2f}× that. Where topyaz-mount's wall clock went: {start:.2f} s before "
            f"the job started (`exec -- true` alone takes "
            f"{walls(lb.res['tm_true']).median:.2f} s"
            + (
                f"; the client hashed {bl.mib(hashed)} of inputs for the manifest, which takes "
                f"{1000 * lb.hash_s:.0f} ms here, measured alone"
                if hashed
                else ""
            )
            + f"); in the job {mkdir:.2f} s for `mkdir out`, {setup - mkdir:.2f} s for the "
            f"listing of `in`, {read:.2f} s "
            f"waiting in reads ({first:.2f} s of it for the first input), {ph['compute']:.2f} s "
            f"of sleeps, {write:.2f} s in writes ({per_write:.0f} ms per output"
            + (f", {per_write / 1000 / lb.rtt:.1f} RTTs" if lb.rtt else "")
            + ")"
            + (f", {other:.2f} s other" if abs(other) >= 0.05 else "")
            + f"; {tail:.2f} s after the job's end (the last outputs, unmount, exit)."
        )
        late = start - walls(lb.res["tm_true"]).median
        if late > 0.5:
            big_start = imed(lb, "big_tm", "job_start")
            m = lb.link.get("photo_tm")
            text += (
                f" The job started {late:.2f} s later than the whole of `exec -- true` takes, "
                f"while the big job, whose one input is announced and prefetched the same way, "
                f"started {big_start:.2f} s after spawn; hashing is "
                f"{1000 * lb.hash_s:.0f} ms of it. The start apparently waits behind the "
                f"prefetch of {p['count']} inputs at once"
                + (
                    f" (the upload was busy from {m['up_first']:.1f} s on, and "
                    f"{bl.mib(imed(lb, 'photo_tm', 'up_at_start'))} had gone up the link when "
                    f"the job started, of {bl.mib(lb.in_bytes)} of inputs)."
                    if m
                    else "."
                )
            )
        if not ok:
            parts = {
                "start-up before the job": start,
                "reads waiting for bytes": read,
                "writes": write,
                "mkdir and listing": setup,
                "the tail after the job": tail,
            }
            order = sorted(parts, key=parts.get, reverse=True)
            text += (
                f" Everything but the sleeps adds {tm - ph['compute']:.2f} s to the "
                f"{ph['compute']:.2f} s of compute (the target allows "
                f"{1.15 * ph['bound'] - ph['compute']:.2f} s); largest first: "
                + ", ".join(f"{k} {parts[k]:.2f} s" for k in order[:3])
                + "."
            )
            if read - first > 0.1 * ph["compute"]:
                text += (
                    f" The reads after the first still waited {read - first:.2f} s: the "
                    f"prefetch did not stay ahead of the job"
                    + (
                        " (on loopback every byte costs CPU on the same 2 cores the "
                        "client, ssh, sshd and the agent share)."
                        if not lb.rtt
                        else "."
                    )
                )
        m = lb.link.get("photo_tm")
        if m and lb.rtt and setup > 5 * lb.rtt and m["up_first"] <= start + setup <= m["up_last"]:
            text += (
                f" The `mkdir` and the listing are one request to the client each, yet took "
                f"{setup / lb.rtt:.0f} RTTs together: they ran while the upload direction was "
                f"full of prefetched inputs ({m['up_first']:.1f}–{m['up_last']:.1f} s after "
                f"spawn), and a reply probably waits behind the data queued ahead of it on the "
                f"one ssh connection."
            )
        if m:
            mr = lb.link.get("photo_raw")
            text += (
                f" On the link: idle {m['before']:.2f} s first, upload busy {m['up']:.1f} s, "
                f"download {m['down']:.1f} s ({m['both']:.1f} s both at once), "
                f"{m['after']:.2f} s after the last busy interval"
                + (
                    f"; the raw pipe's up + down was busy {mr['up']:.1f} s + {mr['down']:.1f} s "
                    f"in sequence."
                    if mr
                    else "."
                )
            )
        out.append(text)
    return out
