"""The ``stage`` section of tools/bench: the stage backend against FUSE and rsync staging.

The ``batch`` section's two jobs (tools/bench_batch.py: a big input read and a
same-size output written; the photo batch with compute time per file), on loopback and
through tools/wanproxy.py, each run as:

* topyaz-mount on the FUSE backend, cold (new bytes in every input);
* topyaz-mount ``--backend stage``, cold, then warm (the same inputs again: the store
  has them, so no content should move up);
* staging by hand: ``rsync -a`` up, the job over ssh, ``rsync -a`` back.

Targets (issue 13): stage cold ≤ 1.0 × rsync staging; 0 content bytes sent warm; the
photo batch's last output on the client ≤ 1 s after the job ends, on loopback. The last
output's arrival is seen here, on the client: a thread polls ``out/`` every 10 ms and
notes when each output first has its full size (outputs arrive by rename, whole).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import bench_batch as bb
import bench_lib as bl

START, END = "<!-- bench:stage:start -->", "<!-- bench:stage:end -->"
STAGE = ["--backend", "stage"]
FUSE = ["--backend", "fuse"]


def add_arguments(ap) -> None:
    g = ap.add_argument_group("stage section (sizes: the batch section's --batch-* options)")
    g.add_argument("--stage-runs", type=int, default=None, help="runs of each (2; --quick 1)")


class Arrivals:
    """When each expected output first shows on the client at its full size (epoch)."""

    def __init__(self, out_dir: Path, sizes: dict[str, int]) -> None:
        self.out_dir = out_dir
        self.sizes = sizes
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set() and len(self.seen) < len(self.sizes):
            for name, size in self.sizes.items():
                if name in self.seen:
                    continue
                try:
                    if (self.out_dir / name).stat().st_size == size:
                        self.seen[name] = time.time()
                except OSError:
                    pass
            time.sleep(0.01)

    def stop(self) -> float | None:
        """The last arrival, or None if some output never arrived whole."""
        self._stop.set()
        self._thread.join()
        if len(self.seen) < len(self.sizes):
            return None
        return max(self.seen.values())


class StageBench(bb.LinkBench):
    """One link: FUSE, stage cold and warm, and rsync staging, for both jobs."""

    def big_run(self, key: str, backend: list[str], cold: bool) -> None:
        argv = [*self.bench.tm_argv(), *backend, "--", "sh", "-c", bb.BIG_JOB, "job", "big.bin"]

        def once():
            self.clean_outputs()
            if cold:
                self.digests.append(bl.freshen(self.root / "big.bin"))
            digest = bl.blake3_file(self.root / "big.bin")
            res = self.timed(argv)
            t = [self.rel(res, float(x)) for x in bb.stamp_line(res, "BENCH-JOB")]
            out = self.root / "out.bin"
            if not out.exists() or bl.blake3_file(out) != digest:
                self.bad.append(f"{self.name} {key}: out.bin differs from big.bin")
            info = {"job_start": t[0], "job_end": t[1]} if t else {}
            return res, info | self.moved(res)

        res, info = self.bench.measure(f"{self.name} {key}", once)
        self.add(key, res, info)
        self.clean_outputs()

    def photo_run(self, key: str, backend: list[str], cold: bool) -> None:
        argv = [
            *self.bench.tm_argv(),
            *backend,
            "--",
            "python3",
            "-c",
            bb.PHOTO_JOB,
            *self.photo_args(),
        ]

        def once():
            self.clean_outputs()
            if cold:
                for path in self.inputs:
                    self.digests.append(bl.freshen(path))
            arrivals = Arrivals(self.root / "out", self.out_sizes)
            res = self.timed(argv)
            last = arrivals.stop()
            bad = self.check_photo_outputs(self.root / "out", digests=cold)
            if bad:
                self.bad.append(f"{self.name} {key}: {bad}")
            info = self.photo_info(res) | self.moved(res)
            m = re.search(r"^BENCH-PHOTO (.*)$", res.stderr, re.M)
            if m and last is not None:
                info["last_after_end"] = last - json.loads(m.group(1))["end"]
            return res, info

        res, info = self.bench.measure(f"{self.name} {key}", once)
        self.add(key, res, info)
        self.clean_outputs()

    def moved(self, res: bl.RunResult) -> dict:
        st = res.stats or {}
        return {
            k: float(st[k]) for k in ("content_bytes_sent", "content_bytes_received") if k in st
        }

    def stage_rounds(self, n: int) -> None:
        b = self.bench
        b.run([*b.ssh_argv(), "true"])  # unrecorded warm-ups
        b.run([*b.tm_argv(), "--", "true"])
        for i in range(n):
            steps = [
                ("big_fuse", lambda: self.big_run("big_fuse", FUSE, cold=True)),
                ("big_stage", lambda: self.big_run("big_stage", STAGE, cold=True)),
                ("big_stage_warm", lambda: self.big_run("big_stage_warm", STAGE, cold=False)),
                ("big_staging", self.big_staging),
                ("photo_fuse", lambda: self.photo_run("photo_fuse", FUSE, cold=True)),
                ("photo_stage", lambda: self.photo_run("photo_stage", STAGE, cold=True)),
                (
                    "photo_stage_warm",
                    lambda: self.photo_run("photo_stage_warm", STAGE, cold=False),
                ),
                ("photo_staging", self.photo_staging),
            ]
            for key, step in steps:
                step()
                self.env.say(f"stage {self.name} {i + 1}/{n} {key}: {self.res[key][-1].wall:.2f} s")
            self.drop_objects()


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    n = args.stage_runs or (1 if args.quick else 2)
    links = ["loopback", "WAN"] if args.batch_links == "both" else [args.batch_links]
    links = ["WAN" if x == "wan" else x for x in links]
    t0 = time.perf_counter()
    load_before = bl.loadavg()
    done: list[StageBench] = []
    for link in links:
        with bb.on_link(env, link, StageBench, "stage") as sb:
            sb.stage_rounds(n)
            done.append(sb)
    return report(env, done, n, time.perf_counter() - t0, load_before)


def report(env, sbs: list[StageBench], n: int, elapsed: float, load_before: str):
    ok = all(not sb.bad for sb in sbs)
    head = ["", *(f"{sb.name}" for sb in sbs)]
    rows: list[list[str]] = []

    def row(label, fn):
        rows.append([label, *(fn(sb) for sb in sbs)])

    def med(sb, key):
        return bb.walls(sb.res[key]).median

    def sent(sb, key):
        return bl.mib(bb.imed(sb, key, "content_bytes_sent"))

    for job, size in (("big", "big in + out"), ("photo", "photo batch")):
        row(f"**{size}**", lambda sb, job=job: size_of(sb, job))
        row("FUSE, cold", lambda sb, job=job: bb.cell(bb.walls(sb.res[f"{job}_fuse"])))
        row(
            "**stage, cold**",
            lambda sb, job=job: "**" + bb.cell(bb.walls(sb.res[f"{job}_stage"])) + "**",
        )
        row("stage, warm", lambda sb, job=job: bb.cell(bb.walls(sb.res[f"{job}_stage_warm"])))
        row(
            "rsync staging (up, job, back)",
            lambda sb, job=job: bb.cell(bb.walls(sb.res[f"{job}_staging"])),
        )
        row(
            "… stage cold: before the job / job / after it ended",
            lambda sb, job=job: split(sb, job),
        )
        row(
            "… rsync staging: up / job / back",
            lambda sb, job=job: (
                " / ".join(f"{bb.imed(sb, f'{job}_staging', k):.2f}" for k in ("up", "job", "down"))
                + " s"
            ),
        )
        row(
            "stage cold / rsync staging (target ≤ 1.0)",
            lambda sb, job=job: f"**{med(sb, f'{job}_stage') / med(sb, f'{job}_staging'):.2f}**",
        )
        row(
            "stage cold / FUSE cold",
            lambda sb, job=job: f"{med(sb, f'{job}_stage') / med(sb, f'{job}_fuse'):.2f}",
        )
        row(
            "content sent cold / warm (target warm 0)",
            lambda sb, job=job: f"{sent(sb, f'{job}_stage')} / **{sent(sb, f'{job}_stage_warm')}**",
        )
    row(
        "photo batch: last output on the client after the job ended, stage cold / warm / FUSE "
        "(target ≤ 1 s on loopback)",
        lambda sb: " / ".join(
            f"{bb.imed(sb, k, 'last_after_end'):.2f} s"
            for k in ("photo_stage", "photo_stage_warm", "photo_fuse")
        ),
    )
    table = "\n".join(bl.md_table(head, rows))
    notes = [x for sb in sbs for x in sb.notes + sb.bad]
    disturbed = sum(len(sb.bench.disturbed) for sb in sbs)
    if disturbed:
        notes.append(
            f"{disturbed} run(s) had other processes using more than "
            f"{env.args.max_foreign:g} cores beside them (a shared machine) and were kept: "
            "compare the ratios of one run, not the seconds across runs."
        )
    md = "\n".join(
        [
            START,
            "## The stage backend against FUSE and rsync staging "
            f"({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "",
            f"`python3 tools/bench --only stage` ({n} run(s) of each, median (min–max); "
            f"{elapsed:.0f} s; load before {load_before}). The batch section's jobs "
            "(tools/bench_batch.py), on loopback and through tools/wanproxy.py "
            f"({env.args.wan_delay_ms:g} ms each way, {env.args.wan_rate_mbit:g} Mbit/s). "
            "Every cold run has new bytes in each input; the warm run repeats it unchanged. "
            "The last output's arrival is seen on the client (a 10 ms poll of `out/`) "
            "against the job's own end stamp.",
            "",
            table,
            "",
            *(f"- {x}" for x in notes),
            END,
        ]
    )
    return md, table, ok


def split(sb: StageBench, job: str) -> str:
    key = f"{job}_stage"
    start, end = bb.imed(sb, key, "job_start"), bb.imed(sb, key, "job_end")
    return f"{start:.2f} / {end - start:.2f} / {bb.walls(sb.res[key]).median - end:.2f} s"


def size_of(sb: StageBench, job: str) -> str:
    if job == "big":
        return bb.size_label(sb.big)
    return f"{len(sb.inputs)} × {bb.size_label(sb.in_bytes // max(len(sb.inputs), 1))}"
