"""The ``ab`` section of tools/bench: this tree against a base revision, in one run.

For a change that must cost nothing measurable on the data path (issue 11: the client's
write-policy checks on every request, and remote text made printable), the 500 x 256 KiB
batch of the ``cache`` section runs on both snapshots, interleaved: each round runs
base then this tree, or this tree then base (alternating), each a cold run (new bytes in
every input, a new client hash index: every file is opened and read through the client)
followed by a warm run (same inputs and index: the manifest answers, no content moves).
Medians and the ratio this/base are reported; both sides share the test host, the
machine's state and the agent's private store.

    python3 tools/bench --only ab --ab-base REV [--ab-rounds N]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import bench_cache
import bench_lib as bl

REPO_DIR = Path(__file__).resolve().parent.parent


def add_arguments(ap) -> None:
    g = ap.add_argument_group("ab section")
    g.add_argument(
        "--ab-base", default="HEAD~1", help="git revision to compare against (default HEAD~1)"
    )
    g.add_argument("--ab-rounds", type=int, default=None, help="rounds (default 7; --quick 3)")


class Side:
    """One snapshot's bench and its results."""

    def __init__(self, env: SimpleNamespace, root: Path, snap: Path, label: str) -> None:
        self.label = label
        self.snap = snap
        self.bench = env.make_bench(root, 1 << 20, snap=snap, sync_before=True)
        self.res: dict[str, list[bl.RunResult]] = {"cold": [], "warm": []}
        self.idx_n = 0
        self.workdir = env.workdir

    def new_index(self) -> dict[str, str]:
        self.idx_n += 1
        d = self.workdir / f"ab-{self.label}-client-{self.idx_n}"
        d.mkdir()
        return dict(self.bench.tm_env, XDG_CACHE_HOME=str(d))

    def argv(self) -> list[str]:
        return [*self.bench.tm_argv(), "--", "python3", "-c", bench_cache.SMALL_JOB, "small"]


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    rounds = args.ab_rounds or (3 if args.quick else 7)
    count, small = args.cache_small_count, args.cache_small_kib << 10
    t0 = time.perf_counter()
    base_rev = args.ab_base
    env.say(f"ab: snapshot of {base_rev}; {count} x {small >> 10} KiB inputs")
    base_snap, base_desc = env.make_snapshot(base_rev)
    root = bench_cache.make_root(1 << 20, count, small)
    digests: list[bytes] = []
    try:
        sides = [
            Side(env, root, base_snap, "base"),
            Side(env, root, env.snap, "this"),
        ]
        host_pid = env.host.pid

        def timed(side: Side, tm_env: dict[str, str]) -> bl.RunResult:
            return bl.timed_run(side.argv(), remote_root=host_pid, cwd=str(root), env=tm_env)

        for n in range(rounds):
            order = sides if n % 2 == 0 else sides[::-1]
            for side in order:

                def cold(side=side):
                    for path in sorted((root / "small").iterdir()):
                        digests.append(bl.freshen(path))
                    tm_env = side.new_index()
                    return timed(side, tm_env), tm_env

                res, tm_env = side.bench.measure(f"ab {side.label} cold", cold)
                side.res["cold"].append(res)
                side.res["warm"].append(
                    side.bench.measure(
                        f"ab {side.label} warm", lambda s=side, e=tm_env: timed(s, e)
                    )
                )
            env.say(f"ab: round {n + 1}/{rounds} done")
        return report(env, sides, base_desc, rounds, count, small, time.perf_counter() - t0)
    finally:
        bl.remove_objects(env.store_dir, digests)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base_snap, ignore_errors=True)


def report(env, sides, base_desc: str, rounds: int, count: int, small: int, elapsed: float):
    base, this = sides
    header = ["run", "base median", "base min–max", "this median", "this min–max", "this / base"]
    rows = []
    for kind in ("cold", "warm"):
        b = bl.Series()
        t = bl.Series()
        for r in base.res[kind]:
            b.add(r.wall)
        for r in this.res[kind]:
            t.add(r.wall)
        rows.append(
            [
                f"{count} × {small >> 10} KiB, {kind}",
                f"{b.median:.2f} s",
                f"{b.min:.2f}–{b.max:.2f} s",
                f"{t.median:.2f} s",
                f"{t.min:.2f}–{t.max:.2f} s",
                f"{t.median / b.median:.3f}",
            ]
        )
    discarded = sum(len(s.bench.discarded) for s in sides)
    title = "A/B: this tree against a base revision (500 × 256 KiB batch)"
    md = [
        *bl.ab_heading(env, "ab", title, elapsed, base_desc),
        f"- {rounds} rounds, each side cold then warm, the order alternating per round; "
        f"{discarded} runs discarded for foreign load and repeated.",
        "",
        *bl.md_table(header, rows),
        "<!-- bench:ab:end -->",
        "",
    ]
    return "\n".join(md), bl.text_table(header, rows), True
