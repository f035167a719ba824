#!/usr/bin/env python3
"""Detachable sessions (issue 14) on the emulated WAN link: two numbers, measured.

    TOPYAZ_MOUNT_TESTHOST_USER=... python3 tools/bench_reconnect.py [--cuts 5]

* **Resume time**: a job prints a line every 20 ms through ``exec --grace``; the link
  (tools/wanproxy.py, 10 ms each way, 200 Mbit/s) is torn down for 3 s and brought
  back on the same port. The time from the link coming back to the next line arriving
  at the client, against one plain ``ssh host true`` through the same link.
* **Idle keepalive traffic**: an idle session (``sleep``) with the default keepalive
  timing, bytes per minute on each direction of the link (the proxy's own counters,
  so ssh's and TCP's overhead are in), for a detachable and an ordinary session.
* **Start-up cost of the detachable default**: ``exec -- true`` through the link,
  ``--grace 15m`` (the default: a relay and a session host start on the remote)
  against ``--grace 0``, alternating, the median of each (``--only startup``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from bench_wan import start_proxy, stop_proxy  # noqa: E402
from testhost import start_testhost  # noqa: E402

REPO = TOOLS.parent
TICKER = "import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.02)\n"


def _exec_argv(host, port: int, root: Path, grace: str, *command: str) -> list[str]:
    return [
        sys.executable, "-m", "topyaz_mount.cli", "exec",
        "--remote", f"{host.remote_user}@127.0.0.1:{port}", "-F", str(host.ssh_config),
        "--remote-python", host.remote_python, "--root", str(root), "--grace", grace,
        "--", *command,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPYAZ_MOUNT_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _end(p: subprocess.Popen) -> None:
    """Ctrl-C (forwarded to the job), so the remote session ends now, not after its
    grace; killed if it lingers."""
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _kill(proxy: subprocess.Popen) -> None:
    proxy.kill()
    proxy.wait()
    stop_proxy(proxy)


def ssh_connect_time(host, port: int) -> float:
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run(
            ["ssh", "-F", str(host.ssh_config), "-p", str(port),
             f"{host.remote_user}@127.0.0.1", "true"],
            check=True, capture_output=True,
        )  # fmt: skip
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def resume_times(host, work: Path, cuts: int) -> tuple[list[float], float]:
    log = work / "proxy.log"
    proxy, port = start_proxy(host.port, 10, 200, log)
    connect = ssh_connect_time(host, port)
    arrivals: list[float] = []
    p = subprocess.Popen(
        _exec_argv(host, port, work, "60", "python3", "-c", TICKER),
        cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip

    def read() -> None:
        assert p.stdout is not None
        for _ in p.stdout:
            arrivals.append(time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    results = []
    try:
        while not arrivals:
            time.sleep(0.05)
        for _ in range(cuts):
            time.sleep(2)
            _kill(proxy)
            time.sleep(3)
            proxy, _ = start_proxy(host.port, 10, 200, log, port)
            back = time.monotonic()
            while not arrivals or arrivals[-1] < back:
                time.sleep(0.005)
            first = next(t for t in arrivals if t >= back)
            results.append(first - back)
    finally:
        _end(p)
        _kill(proxy)
    return results, connect


_RATE = re.compile(r"t=([\d.]+) up_bytes=(\d+) down_bytes=(\d+)")


def idle_traffic(host, work: Path, grace: str, seconds: float) -> tuple[float, float]:
    """Bytes per minute (up, down) of an idle session, between 20 s after start and
    ``seconds`` later (start-up traffic left out)."""
    log = work / f"idle-{grace}.log"
    log.unlink(missing_ok=True)
    proxy, port = start_proxy(host.port, 10, 200, log)
    p = subprocess.Popen(
        _exec_argv(host, port, work, grace, "sleep", str(int(seconds + 40))),
        cwd=work, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(20)
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
    finally:
        _end(p)
        _kill(proxy)
    samples = [(float(t), int(u), int(d)) for t, u, d in _RATE.findall(log.read_text())]
    a = min(samples, key=lambda s: abs(s[0] - start))
    b = min(samples, key=lambda s: abs(s[0] - end))
    minutes = (b[0] - a[0]) / 60
    return (b[1] - a[1]) / minutes, (b[2] - a[2]) / minutes


def startup_times(host, work: Path, runs: int) -> dict[str, float]:
    """Median wall time of ``exec -- true`` by grace, the two alternating."""
    proxy, port = start_proxy(host.port, 10, 200, work / "startup.log")
    times: dict[str, list[float]] = {"15m": [], "0": []}
    try:
        for _ in range(runs):
            for grace in times:
                t0 = time.monotonic()
                subprocess.run(_exec_argv(host, port, work, grace, "true"), cwd=work,
                               env=_env(), check=True, capture_output=True)  # fmt: skip
                times[grace].append(time.monotonic() - t0)
    finally:
        _kill(proxy)
    return {grace: statistics.median(t) for grace, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, default=5)
    ap.add_argument("--idle-seconds", type=float, default=120)
    ap.add_argument("--startup-runs", type=int, default=7)
    ap.add_argument("--only", choices=["startup"], default=None)
    args = ap.parse_args()
    host = start_testhost(log=lambda m: print(m, file=sys.stderr))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o700)
            medians = startup_times(host, work, args.startup_runs)
            print(f"exec -- true (median of {args.startup_runs}): "
                  f"--grace 15m {medians['15m'] * 1000:.0f} ms, "
                  f"--grace 0 {medians['0'] * 1000:.0f} ms")  # fmt: skip
            if args.only == "startup":
                return 0
            times, connect = resume_times(host, work, args.cuts)
            print(f"ssh connect through the link (median of 3): {connect * 1000:.0f} ms")
            print("link back -> data flowing: " + ", ".join(f"{t * 1000:.0f}" for t in times)
                  + f" ms (median {statistics.median(times) * 1000:.0f} ms)")  # fmt: skip
            for grace in ("15m", "0"):
                up, down = idle_traffic(host, work, grace, args.idle_seconds)
                kind = "detachable" if grace != "0" else "ordinary"
                print(f"idle {kind} session: {up:.0f} B/min up, {down:.0f} B/min down")
    finally:
        host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
