"""Measure --bwlimit's rate and the live progress's cost on loopback (docs/performance.md).

    PYTHONPATH=$PWD TOPYAZ_MOUNT_TESTHOST_USER=tmh10 python3 tools/bench_progress.py \
        [--limit-mib 20] [--read-mib 256] [--rounds 3]

* bwlimit: a job reads a fresh random input (not in the remote cache) under
  ``--bwlimit 2M`` (up), and writes an output of the same size under ``--bwlimit 0:2M``
  (down); the rate is the content bytes of ``--stats=json`` over its wall seconds.
* progress: a job reads a fresh random input of --read-mib with stderr on a pty, once
  with the live line and once with ``-q``, interleaved (with/without alternate which
  goes first); each run's wall seconds from ``--stats=json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import testhost  # noqa: E402
from e2e_util import client_env, exec_argv, write_random  # noqa: E402


def run(host, root: Path, command: list[str], options: list[str], pty: bool) -> dict:
    """One exec; its --stats=json figures (stderr on a new pty when ``pty``)."""
    argv = exec_argv(host, root, command, options=[*options, "--stats=json"])
    if not pty:
        r = subprocess.run(argv, cwd=root, env=client_env(), capture_output=True, timeout=600)
        err = r.stderr
    else:
        master, slave = os.openpty()
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        p = subprocess.Popen(argv, cwd=root, env=client_env(), stdout=subprocess.DEVNULL,
                             stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        p.wait(600)
        reader.join(10)
        os.close(master)
        r = subprocess.CompletedProcess(argv, p.returncode)
        err = b"".join(chunks)
    if r.returncode != 0:
        raise SystemExit(f"exec failed ({r.returncode}): {err[-2000:]!r}")
    line = [x for x in err.replace(b"\r", b"\n").splitlines() if b"wall_seconds" in x][-1]
    return json.loads(line[line.index(b"{"):])


def bwlimit(host, root: Path, mib: int) -> None:
    write_random(root / "in.bin", mib << 20)
    up = run(host, root, ["sh", "-c", 'cat "$1" > /dev/null', "sh", "./in.bin"],
             ["--bwlimit", "2M"], False)
    down = run(host, root, ["sh", "-c", f"head -c {mib << 20} /dev/urandom > out.bin"],
               ["--bwlimit", "0:2M"], False)
    for name, stats, key in (("up", up, "content_bytes_sent"),
                             ("down", down, "content_bytes_received")):
        rate = stats[key] / stats["wall_seconds"]
        print(f"bwlimit 2M {name}: {stats[key] / 2**20:.1f} MiB in {stats['wall_seconds']:.2f} s"
              f" = {rate / 2**20:.3f} MiB/s ({rate / (2 << 20) * 100 - 100:+.1f} % of 2 MiB/s)")


def progress_cost(host, root: Path, mib: int, rounds: int) -> None:
    times: dict[str, list[float]] = {"line": [], "quiet": []}
    for i in range(rounds):
        order = ["line", "quiet"] if i % 2 == 0 else ["quiet", "line"]
        for mode in order:
            write_random(root / "in.bin", mib << 20)  # fresh: never a cache hit
            stats = run(host, root, ["sh", "-c", 'cat "$1" > /dev/null', "sh", "./in.bin"],
                        [] if mode == "line" else ["-q"], True)
            assert stats["content_bytes_sent"] == mib << 20, stats
            times[mode].append(stats["wall_seconds"])
    for mode, values in times.items():
        print(f"progress {mode:5}: {mib} MiB read, wall s {sorted(values)}, "
              f"median {statistics.median(values):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-mib", type=int, default=20)
    ap.add_argument("--read-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-bwlimit", action="store_true")
    ap.add_argument("--skip-progress", action="store_true")
    args = ap.parse_args()
    host = testhost.start_testhost(log=lambda msg: print(msg, file=sys.stderr))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            root.mkdir(mode=0o700)
            if not args.skip_bwlimit:
                bwlimit(host, root, args.limit_mib)
            if not args.skip_progress:
                progress_cost(host, root, args.read_mib, args.rounds)
    finally:
        host.stop()


if __name__ == "__main__":
    main()
