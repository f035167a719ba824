"""The ``bwlimit`` section of tools/bench: ``--bwlimit`` against its limit on the
emulated WAN link (tools/wanproxy.py, by default 20 ms RTT and 200 Mbit/s each way).

For each limit (``--bwlimit-rates``, default 2M and 10M, in MiB/s as the flag counts)
one job reads a fresh random input the host's cache lacks (``cat in.bin``, under
``--bwlimit L``: the client's writer, *up*) and one job writes an output of the same
size (``head -c`` from /dev/urandom, under ``--bwlimit 0:L``: the agent's writer,
*down*), ``--bwlimit-mib`` each (default 20). Two rates for each:

* **link**: what the proxy put on that direction of the link while the transfer was in
  its stride: from the end of the first 0.1 s log interval that carried bulk (at least
  a quarter of the limit) to the start of the last, the bytes over the seconds. The
  first interval is left out because the bucket starts full (a tenth of a second's
  worth goes at once), the last because the transfer ends inside it; ssh's framing is
  counted (well under 1 %);
* **job**: the content bytes of ``--stats=json`` over its ``wall_seconds``, the job's
  start (its round trips) and end (the commit) included, so a little under the limit.

The figure against the target (within 5 % of the limit) is the link's.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_batch
import bench_lib as bl
import bench_wan


def add_arguments(ap) -> None:
    g = ap.add_argument_group("bwlimit section")
    g.add_argument("--bwlimit-rates", default="2M,10M", help="limits to measure (2M,10M)")
    g.add_argument("--bwlimit-mib", type=int, default=20, help="input / output size (20)")
    g.add_argument("--bwlimit-runs", type=int, default=None, help="runs of each (3; --quick 1)")


def _stats(stderr: bytes) -> dict:
    line = [x for x in stderr.splitlines() if b"wall_seconds" in x][-1]
    return json.loads(line[line.index(b"{") :])


def _stride(log, m0: float, m1: float, col: int, limit: int) -> tuple[float, float]:
    """(bytes, seconds) on one direction of the link between the end of the first and
    the start of the last interval of [m0, m1] that carried at least a quarter of
    ``limit`` a second (col 1: up, 2: down): the first holds the bucket's initial
    burst, the last the transfer's tail; neither is the rate."""
    pts = [p for p in log if m0 - bench_wan.LOG_INTERVAL <= p[0] <= m1 + 0.2]
    busy = [
        (a, b)
        for a, b in zip(pts, pts[1:], strict=False)
        if (b[col] - a[col]) >= 0.25 * limit * max(b[0] - a[0], 1e-9)
    ]
    if len(busy) < 3:
        return float("nan"), float("nan")
    first, last = busy[0][1], busy[-1][0]
    return float(last[col] - first[col]), last[0] - first[0]


def _once(env, bench, root: Path, log_path: Path, text: str, direction: str) -> dict:
    """One job under ``--bwlimit``: the input up (``text``) or an output down (``0:text``);
    its rates, and whether every byte moved."""
    size = env.args.bwlimit_mib << 20
    if direction == "up":
        flag, command, key, col = text, "cat in.bin > /dev/null", "content_bytes_sent", 1
    else:
        flag, key, col = f"0:{text}", "content_bytes_received", 2
        command = f"head -c {size} /dev/urandom > out.bin"
    bl.freshen(root / "in.bin")  # a new version: the host's cache lacks it
    (root / "out.bin").unlink(missing_ok=True)
    m0 = time.monotonic()
    r = subprocess.run(
        [*bench.tm, "--bwlimit", flag, "--", "sh", "-c", command],
        cwd=root,
        env=bench.tm_env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    m1 = time.monotonic()
    if r.returncode != 0:
        raise bl.RunFailed(f"bwlimit {flag}: {r.stderr[-500:]!r}")
    stats = _stats(r.stderr)
    moved = int(stats[key])
    whole = moved == size and (direction == "up" or (root / "out.bin").stat().st_size == size)
    time.sleep(3 * bench_wan.LOG_INTERVAL)  # the proxy's last interval logged
    limit = _rate(text)
    nbytes, secs = _stride(bench_batch.read_log(log_path), m0, m1, col, limit)
    return {
        "flag": flag,
        "bps": limit,
        "link": nbytes / secs if secs > 0 else float("nan"),
        "job": moved / stats["wall_seconds"],
        "whole": whole,
    }


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    n = args.bwlimit_runs or (1 if args.quick else 3)
    rates = [r.strip() for r in args.bwlimit_rates.split(",") if r.strip()]
    load_before = bl.loadavg()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="topyaz-bench-bw-"))
    os.chmod(root, 0o700)
    log_path = env.workdir / "wanproxy-bwlimit.log"
    proxy, port = bench_wan.start_proxy(
        env.host.port, args.wan_delay_ms, args.wan_rate_mbit, log_path
    )
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        (root / "big.bin").write_bytes(b"\0" * 4096)  # the Bench wants one; not used here
        bench = env.make_bench(root, 4096, port=port)
        bl.write_random_file(root / "in.bin", args.bwlimit_mib << 20)
        for i in range(n):
            for text in rates:
                for direction in ("up", "down"):
                    env.say(f"bwlimit {text} {direction}: {args.bwlimit_mib} MiB, run {i + 1}")
                    one = _once(env, bench, root, log_path, text, direction)
                    runs.setdefault((one["flag"], direction), []).append(one)
    finally:
        bench_wan.stop_proxy(proxy)
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        {
            "flag": flag,
            "direction": direction,
            "bps": rs[0]["bps"],
            "link": statistics.median(r["link"] for r in rs),
            "links": sorted(r["link"] for r in rs),
            "job": statistics.median(r["job"] for r in rs),
        }
        for (flag, direction), rs in runs.items()
    ]
    notes = [
        f"`{flag}` {direction}: a run did not move every byte"
        for (flag, direction), rs in runs.items()
        if not all(r["whole"] for r in rs)
    ]
    md = report(env, rows, n, notes, time.perf_counter() - t0, load_before)
    return md, table(rows), not notes


def _rate(text: str) -> int:
    """``2M`` in bytes a second, counted as ``--bwlimit`` counts (in 1024s)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    unit = units.get(text[-1].upper(), 1)
    return int(float(text[:-1] if unit > 1 else text) * unit)


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.1f} %".replace("-", "−")


def table(rows: list[dict]) -> str:
    out = [f"{'flag':>8} {'dir':>5} {'link MiB/s':>11} {'vs limit':>9} {'job MiB/s':>10}"]
    for r in rows:
        out.append(
            f"{r['flag']:>8} {r['direction']:>5} {r['link'] / 2**20:>11.3f} "
            f"{_pct(r['link'] / r['bps']):>9} {r['job'] / 2**20:>10.3f}"
        )
    return "\n".join(out)


def report(
    env, rows: list[dict], n: int, notes: list[str], elapsed: float, load_before: str
) -> str:
    args = env.args
    within = all(abs(r["link"] / r["bps"] - 1) <= 0.05 for r in rows)
    lines = [
        "<!-- bench:bwlimit:start -->",
        "## `--bwlimit` on the emulated WAN link (`tools/bench --only bwlimit`)",
        "",
        f"{env.date()}, {env.source_desc}; {env.machine['nproc']} × {env.machine['cpu']}. "
        "The test host's sshd behind "
        f"tools/wanproxy.py ({2 * args.wan_delay_ms:g} ms RTT, {args.wan_rate_mbit:g} Mbit/s "
        f"each way). Per limit: a {args.bwlimit_mib} MiB fresh random input read on the host "
        f"(`--bwlimit L`: up), then a {args.bwlimit_mib} MiB output written there "
        f"(`--bwlimit 0:L`: down); {n} run(s) of each, medians. *Link*: the bytes the proxy "
        "put on that direction over the transfer's stride (from the end of its first 0.1 s "
        "interval of bulk to the start of its last: the first holds the bucket's initial "
        "tenth of a second's worth, the last the tail); *job*: `--stats=json`'s content "
        "bytes over its `wall_seconds`, start and commit included. Target: the link within "
        "5 % of the limit.",
        "",
        "| `--bwlimit` | direction | link (median) | vs the limit | each run | job | job vs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = ", ".join(_pct(x / r["bps"]) for x in r["links"])
        lines.append(
            f"| `{r['flag']}` | {r['direction']} | {r['link'] / 2**20:.3f} MiB/s | "
            f"{_pct(r['link'] / r['bps'])} | {each} | "
            f"{r['job'] / 2**20:.3f} MiB/s | {_pct(r['job'] / r['bps'])} |"
        )
    lines += [
        "",
        f"Every median within 5 % of its limit on the link: **{'yes' if within else 'no'}**. "
        f"Load average before {load_before}, after {bl.loadavg()} (2 cores, shared); "
        f"{elapsed:.0f} s in all.",
    ]
    lines += [f"- {x}" for x in notes]
    lines.append("<!-- bench:bwlimit:end -->")
    return "\n".join(lines) + "\n"
