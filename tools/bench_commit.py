#!/usr/bin/env python3
"""The client's commit path, Linux calls against the portable ones (osapi.py), same run.

Each measurement is a fresh process (the implementation is chosen at import, as in the
client) that commits N files of SIZE bytes through ``FileServer`` (CommitBegin, one
CommitChunk per 256 KiB, CommitEnd: temp file, hash check, fsync, rename, directory
fsync) into a new directory, and prints the seconds the commits took. Rounds alternate
which implementation goes first; the medians are printed.

    python3 tools/bench_commit.py [--rounds 7] [--files 500] [--size 262144] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 256 << 10


def one_run(root: str, files: int, size: int) -> float:
    """Commit ``files`` outputs into ``root``/out; seconds taken (inputs made beforehand)."""
    import blake3
    import trio

    from topyaz_mount.client.fileserver import FileServer
    from topyaz_mount.client.hashindex import HashIndex
    from topyaz_mount.wire import proto

    os.makedirs(os.path.join(root, "out"))
    datas = [os.urandom(size) for _ in range(files)]
    digests = [blake3.blake3(d).digest() for d in datas]
    index = HashIndex(Path(root).parent / "hashes.sqlite")
    server = FileServer(Path(root), index=index)

    async def commit_all() -> None:
        for i, (data, digest) in enumerate(zip(datas, digests, strict=True), 1):
            await server.handle(proto.CommitBegin(i, b"out/img_%04d.tif" % i, 0o644))
            for off in range(0, len(data), CHUNK):
                server.handle_chunk(proto.CommitChunk(i, off, data[off : off + CHUNK]))
            await server.handle(proto.CommitEnd(i, len(data), digest))

    try:
        start = time.perf_counter()
        trio.run(commit_all)
        return time.perf_counter() - start
    finally:
        server.close()


def measure(portable: bool, files: int, size: int, base: str) -> float:
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TOPYAZ_MOUNT_PORTABLE"}
        if portable:
            env["TOPYAZ_MOUNT_PORTABLE"] = "1"
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import bench_commit as b; "
            "print(b.one_run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))"
        )
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                os.path.dirname(os.path.abspath(__file__)),
                os.path.join(tmp, "root"),
                str(files),
                str(size),
            ],
            env=env,
            check=False,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            sys.exit(f"a run failed:\n{out.stderr}")
        return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--size", type=int, default=256 << 10)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    times: dict[str, list[float]] = {"linux": [], "portable": []}
    for r in range(args.rounds):
        order = ["linux", "portable"] if r % 2 == 0 else ["portable", "linux"]
        for name in order:
            seconds = measure(name == "portable", args.files, args.size, args.dir)
            times[name].append(seconds)
            print(f"round {r + 1} {name:8} {seconds:.3f} s", flush=True)
    for name, values in times.items():
        print(
            f"{name:8} median {statistics.median(values):.3f} s "
            f"(min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"
        )


if __name__ == "__main__":
    main()
