"""The ``inputs`` section of tools/bench: inputs the command line does not name, on the
emulated WAN link (tools/wanproxy.py), this tree against a base revision in one run.

Jobs that find their own inputs (issue 16), each cold (new bytes in every input and a
new client hash index: no cache anywhere has them) then warm (the same again):

* ``glob``: 100 × 256 KiB read by ``sh -c 'cat small/*.bin > /dev/null'`` (the remote
  shell expands the glob, so no argument names a file);
* ``ffmpeg``: an image sequence read by real ffmpeg,
  ``ffmpeg -i frames/%05d.png -c copy -f null -`` (the pattern is an argument);
* ``ffmpeg-sh``: the same through ``sh -c`` (no argument the client can read);
* ``tiny``: 3 × as many 4 KiB files (sidecars, say) read by ``sh -c 'cat tiny/*.xmp'``:
  round trips, not bytes, are their cost, so the figure is time a file (the listing
  carries their content, fileserver.INLINE_FILE_MAX).

Each cold run comes right after an ``exec -- true`` on the same side (its start-up):
the link fraction is bytes / ((cold - true) × the link's rate). Both sides share the
test host, the proxy, the machine's state and the agent's private store; rounds
alternate which side goes first.

    python3 tools/bench --only inputs [--inputs-base REV] [--inputs-rounds N]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_lib as bl
import bench_wan

GLOB_JOB = ["sh", "-c", "cat small/*.bin > /dev/null"]
FFMPEG = ["ffmpeg", "-nostdin", "-v", "error", "-i", "frames/%05d.png", "-c", "copy"]
FFMPEG_JOB = [*FFMPEG, "-f", "null", "-"]
FFMPEG_SH_JOB = ["sh", "-c", " ".join(FFMPEG_JOB)]
TINY_JOB = ["sh", "-c", "cat tiny/*.xmp > /dev/null"]
JOBS = {"glob": GLOB_JOB, "ffmpeg": FFMPEG_JOB, "ffmpeg-sh": FFMPEG_SH_JOB, "tiny": TINY_JOB}
TARGET = 0.85
NO_TARGET = {"ffmpeg-sh", "tiny"}  # figures to read, without a target of their own
DIRS = {"glob": "small", "ffmpeg": "frames", "ffmpeg-sh": "frames", "tiny": "tiny"}


def add_arguments(ap) -> None:
    g = ap.add_argument_group("inputs section")
    g.add_argument("--inputs-base", default="main", help="revision to compare with (main)")
    g.add_argument("--inputs-rounds", type=int, default=None, help="rounds (3; --quick 2)")
    g.add_argument("--inputs-count", type=int, default=100, help="files per job (100)")


def make_root(count: int) -> Path:
    """small/: ``count`` × 256 KiB of random bytes; frames/: as many PNGs of noise;
    tiny/: 3 × ``count`` files of 4 KiB."""
    root = Path(tempfile.mkdtemp(prefix="topyaz-bench-inputs-"))
    os.chmod(root, 0o700)
    bl.write_random_file(root / "big.bin", 1 << 20)  # Bench wants one
    (root / "small").mkdir()
    for i in range(count):
        (root / "small" / f"in{i:05d}.bin").write_bytes(os.urandom(256 << 10))
    (root / "tiny").mkdir()
    for i in range(3 * count):
        (root / "tiny" / f"s{i:05d}.xmp").write_bytes(os.urandom(4 << 10))
    (root / "frames").mkdir()
    noise = "nullsrc=s=320x320,geq=random(1)*255:random(2)*255:random(3)*255"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", noise, "-frames:v",
         str(count), "-pix_fmt", "rgb24", str(root / "frames" / "%05d.png")],
        check=True,
    )  # fmt: skip
    return root


def inputs_of(root: Path, job: str) -> list[Path]:
    return sorted((root / DIRS[job]).iterdir())


def freshen_middle(path: Path) -> bytes:
    """New bytes mid-file (a PNG keeps its header; ``-c copy`` decodes nothing)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(16), os.fstat(fd).st_size // 2)
    finally:
        os.close(fd)
    return bl.blake3_file(path)


class Side:
    def __init__(self, env, root: Path, snap: Path, port: int, proxy, label: str) -> None:
        self.label = label
        self.bench = env.make_bench(root, 1 << 20, snap=snap, port=port, sync_before=True)
        self.bench.helper_cpu = lambda: bench_wan.cpu_seconds(proxy.pid)
        self.res: dict[str, list[bl.RunResult]] = {}
        self.workdir = env.workdir
        self.indexes = 0

    def new_index(self) -> dict[str, str]:
        self.indexes += 1
        d = self.workdir / f"inputs-{self.label}-client-{self.indexes}"
        d.mkdir()
        return dict(self.bench.tm_env, XDG_CACHE_HOME=str(d))


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    rounds = args.inputs_rounds or (2 if args.quick else 3)
    t0 = time.perf_counter()
    env.say(f"inputs: snapshot of {args.inputs_base}; {args.inputs_count} files per job")
    base_snap, base_desc = env.make_snapshot(args.inputs_base)
    root = make_root(args.inputs_count)
    digests: list[bytes] = []
    proxy = None
    try:
        proxy, port = bench_wan.start_proxy(
            env.host.port, args.wan_delay_ms, args.wan_rate_mbit, env.workdir / "wanproxy.log"
        )
        sides = [
            Side(env, root, base_snap, port, proxy, "base"),
            Side(env, root, env.snap, port, proxy, "this"),
        ]
        for side in sides:  # unrecorded warm-ups (disk cache, .pyc, ssh)
            side.bench.run([*side.bench.tm_argv(), "--", "true"])
        host_pid = env.host.pid

        def timed(side: Side, argv: list[str], tm_env: dict[str, str]) -> bl.RunResult:
            return bl.timed_run(argv, remote_root=host_pid, cwd=str(root), env=tm_env)

        for n in range(rounds):
            for side in sides if n % 2 == 0 else sides[::-1]:
                b = side.bench
                for job, command in JOBS.items():
                    argv = [*b.tm_argv(), "--", *command]
                    tm_env = side.new_index()
                    for path in inputs_of(root, job):
                        digests.append(freshen_middle(path))
                    true = b.measure(f"{side.label} true", lambda s=side, e=tm_env: timed(
                        s, [*s.bench.tm_argv(), "--", "true"], e))  # fmt: skip
                    cold = b.measure(f"{side.label} {job} cold", lambda s=side, a=argv, e=tm_env:
                                     timed(s, a, e))  # fmt: skip
                    warm = b.measure(f"{side.label} {job} warm", lambda s=side, a=argv, e=tm_env:
                                     timed(s, a, e))  # fmt: skip
                    for kind, res in (("true", true), ("cold", cold), ("warm", warm)):
                        side.res.setdefault(f"{job} {kind}", []).append(res)
            env.say(f"inputs: round {n + 1}/{rounds} done")
        return report(env, sides, root, base_desc, rounds, time.perf_counter() - t0)
    finally:
        if proxy is not None:
            bench_wan.stop_proxy(proxy)
        bl.remove_objects(env.store_dir, digests)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base_snap, ignore_errors=True)


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(env, sides, root: Path, base_desc: str, rounds: int, elapsed: float):
    rate = env.args.wan_rate_mbit * 1e6 / 8
    header = ["job", "run", "base", "this", "this / base", "target"]
    rows = []
    ok = True
    for job in JOBS:
        nbytes = sum(p.stat().st_size for p in inputs_of(root, job))
        count = len(inputs_of(root, job))
        label = f"`{' '.join(JOBS[job])}` ({count} files, {bl.mib(nbytes)})"
        fractions = []
        per_file = []
        cells = []
        for side in sides:
            trues = [r.wall for r in side.res[f"{job} true"]]
            colds = [r.wall for r in side.res[f"{job} cold"]]
            pairs = list(zip(colds, trues, strict=True))
            frac = _med([nbytes / max(c - t, 1e-9) / rate for c, t in pairs])
            fractions.append(frac)
            per_file.append(_med([(c - t) / count * 1000 for c, t in pairs]))
            if job == "tiny":
                cells.append(f"{_med(colds):.2f} s; {per_file[-1]:.1f} ms a file")
            else:
                cells.append(f"{_med(colds):.2f} s; {frac:.2f} of the link")
        met = fractions[1] >= TARGET
        ok = ok and (met or job in NO_TARGET)
        if job == "tiny":
            compared = f"{per_file[1] / per_file[0]:.2f}× the time a file"
        else:
            compared = f"{fractions[1] / fractions[0]:.2f}× the fraction"
        target = "none of its own" if job in NO_TARGET else (
            f"≥ {TARGET}: **{'met' if met else 'missed'}**")  # fmt: skip
        rows.append([label, "cold (start-up taken out)", *cells, compared, target])
        warm_cells = []
        sent = []
        for side in sides:
            warms = side.res[f"{job} warm"]
            sent.append(_med([float((r.stats or {}).get("content_bytes_sent", 0)) for r in warms]))
            warm_cells.append(f"{_med([r.wall for r in warms]):.2f} s; {bl.mib(sent[-1])} sent")
        rows.append([label, "warm", *warm_cells,
                     f"{_med([r.wall for r in sides[1].res[f'{job} warm']]) / _med([r.wall for r in sides[0].res[f'{job} warm']]):.2f}",  # noqa: E501
                     f"0 B: **{'met' if sent[1] == 0 else 'missed'}**"])  # fmt: skip
        ok = ok and sent[1] == 0
    true_cells = [
        f"{_med([r.wall for j in JOBS for r in s.res[f'{j} true']]):.2f} s" for s in sides
    ]
    rows.append(["`exec -- true`", "start-up (the runs just before)", *true_cells, "", ""])
    discarded = sum(len(s.bench.discarded) for s in sides)
    title = "Inputs the command line does not name (emulated WAN link)"
    md = [
        *bl.ab_heading(env, "inputs", title, elapsed, base_desc),
        f"- Link: tools/wanproxy.py, {env.args.wan_delay_ms:g} ms each way, "
        f"{env.args.wan_rate_mbit:g} Mbit/s ({rate / 1e6:.0f} MB/s).",
        f"- {rounds} rounds, the sides' order alternating; every cold run has new bytes in "
        "each input and a new client hash index, and follows an `exec -- true` of the same "
        "side: the fraction of the link is bytes / ((cold − true) × rate), median over "
        f"rounds. {discarded} runs discarded for foreign load and repeated.",
        "- `ffmpeg-sh` runs the same ffmpeg through `sh -c`, so no argument names the "
        "sequence: the agent learns it from the opens (no target of its own).",
        "- `tiny`: 4 KiB files, whose cost is round trips, not bytes: the figure is the time "
        "a file, start-up taken out (no target of its own).",
        "",
        *bl.md_table(header, rows),
        "<!-- bench:inputs:end -->",
        "",
    ]
    return "\n".join(md), bl.text_table(header, rows), ok
