"""Outputs that stream home while they are written (real sshd and FUSE).

A new output written front to back starts uploading once it passes STREAM_AFTER;
a write behind what was sent, a truncate, a rename or an unlink must fall back to a
whole-file commit at close. Every case checks the bytes that land on the client.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from e2e_util import ExecProcess, describe, exec_argv, run_exec, temp_files, wait_until
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)

MiB = 1 << 20

WRITER = """
import hashlib, os, sys, time
name, mode = sys.argv[1], sys.argv[2]
h = hashlib.sha256()
with open(name, "wb") as f:
    for i in range(24):
        block = bytes([i]) * MiB if mode != "random" else os.urandom(MiB)
        f.write(block); f.flush(); h.update(block)
        time.sleep(0.01)
    if mode == "seekback":
        f.seek(10); f.write(b"PATCHED"); f.flush()
    if mode == "truncate":
        f.truncate(20 * MiB)
if mode == "rename":
    os.rename(name, name + ".moved")
if mode == "unlink":
    os.unlink(name)
print(h.hexdigest())
""".replace("MiB", str(MiB))


def _write(testhost, root, mode: str):
    r = run_exec(testhost, root, "python3", "-c", WRITER, "big.out", mode,
                 options=("--stats=json",))
    assert r.returncode == 0, describe(r)
    stats = json.loads(r.stderr.decode().strip().splitlines()[-1])
    return r.stdout.decode().strip(), stats


def test_streamed_output_is_exact(testhost, client_root):
    digest, stats = _write(testhost, client_root, "random")
    data = (client_root / "big.out").read_bytes()
    assert len(data) == 24 * MiB
    assert hashlib.sha256(data).hexdigest() == digest
    assert stats["files_committed"] == 1
    assert temp_files(client_root) == []


def test_write_behind_the_upload_falls_back_to_a_whole_commit(testhost, client_root):
    _write(testhost, client_root, "seekback")
    data = (client_root / "big.out").read_bytes()
    assert len(data) == 24 * MiB
    assert data[10:17] == b"PATCHED"
    assert data[:10] == bytes(10) and data[17:MiB] == bytes(MiB - 17)
    assert data[-MiB:] == bytes([23]) * MiB
    assert temp_files(client_root) == []


def test_truncate_during_upload(testhost, client_root):
    _write(testhost, client_root, "truncate")
    data = (client_root / "big.out").read_bytes()
    assert len(data) == 20 * MiB
    assert data[-MiB:] == bytes([19]) * MiB
    assert temp_files(client_root) == []


def test_rename_after_streaming_lands_at_the_new_name(testhost, client_root):
    digest, _ = _write(testhost, client_root, "rename")
    assert not (client_root / "big.out").exists()
    data = (client_root / "big.out.moved").read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest
    assert temp_files(client_root) == []


def test_unlinked_output_never_lands(testhost, client_root):
    _write(testhost, client_root, "unlink")
    assert not (client_root / "big.out").exists()
    assert temp_files(client_root) == []


HOLD_OPEN = """
import os, time
with open("slow.out", "wb") as f:
    f.write(b"x" * (16 << 20))
    print("written", flush=True)
    deadline = time.time() + 60
    while not os.path.exists("go") and time.time() < deadline:
        time.sleep(0.05)
    f.write(b"y" * (1 << 20))
"""


def _commit_bytes_held(pid: int, root: Path) -> int:
    """Bytes in the client's open commit temporaries (named or O_TMPFILE) under root."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(str(root)) and ("#" in target or ".tmcommit-" in target):
                total += os.stat(fd).st_size
        except OSError:
            pass
    return total


def test_output_held_open_streams_home_before_it_is_closed(testhost, client_root):
    """The kernel keeps a writer's pages dirty (here 16 MiB, for good while the file is
    open); the agent asks it for them, so the upload follows the writer."""
    p = ExecProcess(exec_argv(testhost, client_root, ["python3", "-c", HOLD_OPEN]),
                    cwd=client_root)
    try:
        assert p.wait_for_stdout(b"written", 30), p.stderr
        assert wait_until(lambda: _commit_bytes_held(p.pid, client_root) >= 16 << 20, 30)
        (client_root / "go").write_bytes(b"")
        assert p.proc.wait(60) == 0, p.stderr
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
    assert (client_root / "slow.out").read_bytes() == b"x" * (16 << 20) + b"y" * (1 << 20)
    assert temp_files(client_root) == []
