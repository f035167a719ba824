"""Faults on the way home of an output: the remote disk fills, the job renames (real sshd, FUSE).

* A write into the remote spool that failed (ENOSPC) reaches the job at close/fsync, the
  output is never committed over the local file, and exec names it and fails.
* Outputs follow renames: a directory renamed while its files are written or committed,
  a file renamed while its commit is in flight, a rename over another output, a file
  moved into a directory made after it. These run over an emulated slow link
  (tools/wanproxy.py), so a commit is still on the wire when the job renames.

Every case checks the exit status, every byte of every output, and that nothing else
(an old directory, a commit temporary, a conflict copy) is left in the client root.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest
from bench_wan import start_proxy, stop_proxy
from e2e_util import REMOTE_USER, describe, run_exec, sessions_dir, temp_files, wait_until
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)

pytestmark = [pytest.mark.e2e, pytest.mark.both_os_calls]

MiB = 1 << 20

# The job's side: write random bytes, remember their sha256 under the path they must end
# up at, print the map as JSON at the end.
PRELUDE = """
import hashlib, json, os, sys
MiB = 1 << 20
final = {}
def fill(f, size):
    h = hashlib.sha256()
    while size:
        block = os.urandom(min(MiB, size))
        f.write(block); f.flush(); h.update(block); size -= len(block)
    return h
def write(path, size):
    with open(path, "wb") as f:
        return fill(f, size).hexdigest()
"""
EPILOGUE = "\nprint(json.dumps(final))\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> set[str]:
    """Every file and directory below root, as relative paths."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_job(testhost, root: Path, body: str, *, remote: str | None = None, options=(),
            timeout: float = 180):
    return run_exec(testhost, root, "python3", "-c", PRELUDE + body + EPILOGUE,
                    remote=remote, options=options, timeout=timeout)


def assert_outputs(r: subprocess.CompletedProcess, root: Path, dirs: set[str]) -> None:
    """Exit 0, every output the job reported byte for byte, and nothing else under out/."""
    assert r.returncode == 0, describe(r)
    final = json.loads(r.stdout.decode().strip().splitlines()[-1])
    for rel, digest in final.items():
        assert (root / rel).is_file(), f"{rel} missing\n{describe(r)}"
        assert sha256(root / rel) == digest, f"{rel} differs\n{describe(r)}"
    expected = {str(Path(rel).relative_to("out")) for rel in final} | dirs
    assert tree(root / "out") == expected, describe(r)
    assert temp_files(root) == []
    assert b"remote-conflict" not in r.stderr, describe(r)


# --------------------------------------------------------------------------- slow link


@pytest.fixture
def slow_remote(testhost, tmp_path):
    """``--remote`` through an emulated 80 Mbit/s, 10 ms link: commits take seconds."""
    proxy, port = start_proxy(testhost.port, 10, 80, tmp_path / "wanproxy.log")
    try:
        yield f"{testhost.remote_user}@127.0.0.1:{port}"
    finally:
        stop_proxy(proxy)


@pytest.fixture
def out_dir(client_root) -> Path:
    (client_root / "out").mkdir()
    return client_root / "out"


def test_directory_renamed_right_after_its_files_close(testhost, client_root, out_dir,
                                                        slow_remote):
    """The reported case: the job renames a directory whose outputs are on the wire."""
    body = """
os.mkdir("out/d1")
big = write("out/d1/r.bin", 20 * MiB)
small = write("out/d1/s.bin", 2 * MiB)
os.rename("out/d1", "out/d2")
final["out/d2/r.bin"] = big
final["out/d2/s.bin"] = small
"""
    r = run_job(testhost, client_root, body, remote=slow_remote)
    assert_outputs(r, client_root, {"d2"})


def test_directory_renamed_while_its_commit_streams(testhost, client_root, out_dir, slow_remote):
    """A whole-file commit bigger than the send queue: the rename meets its chunks."""
    body = """
os.mkdir("out/d1")
with open("out/d1/r.bin", "wb") as f:
    fill(f, MiB)
    os.ftruncate(f.fileno(), MiB)  # no upload follows this writer: one commit at close
    fill(f, 63 * MiB)
os.rename("out/d1", "out/d2")
with open("out/d2/r.bin", "rb") as f:
    final["out/d2/r.bin"] = hashlib.sha256(f.read()).hexdigest()
"""
    r = run_job(testhost, client_root, body, remote=slow_remote)
    assert_outputs(r, client_root, {"d2"})


def test_directory_renamed_while_its_files_are_written(testhost, client_root, out_dir,
                                                        slow_remote):
    """Before any commit: the files are still open, one already streaming home. Its
    upload survives the rename: the output crosses the link once, not again whole."""
    body = """
import time
os.makedirs("out/d1/sub")
big = open("out/d1/r.bin", "wb")
small = open("out/d1/sub/s.bin", "wb")
hb = fill(big, 20 * MiB)
hs = fill(small, 100000)
time.sleep(1)  # let the upload catch up with the writer
os.rename("out/d1", "out/d2")
for f, h, size in ((big, hb, 8 * MiB), (small, hs, 5000)):
    while size:
        block = os.urandom(min(MiB, size))
        f.write(block); h.update(block); size -= len(block)
    f.close()
final["out/d2/r.bin"] = hb.hexdigest()
final["out/d2/sub/s.bin"] = hs.hexdigest()
"""
    r = run_job(testhost, client_root, body, remote=slow_remote, options=("--stats=json",))
    assert_outputs(r, client_root, {"d2", "d2/sub"})
    stats = json.loads(r.stderr.decode().strip().splitlines()[-1])
    assert stats["wire_bytes_received"] < 32 * MiB, stats  # 28 MiB of outputs


def test_directory_moved_into_a_directory_made_after_it(testhost, client_root, out_dir,
                                                        slow_remote):
    body = """
os.mkdir("out/tmp")
data = write("out/tmp/r.bin", 20 * MiB)
os.mkdir("out/done")
os.rename("out/tmp", "out/done/job1")
final["out/done/job1/r.bin"] = data
"""
    r = run_job(testhost, client_root, body, remote=slow_remote)
    assert_outputs(r, client_root, {"done", "done/job1"})


def test_file_renamed_while_its_commit_is_in_flight(testhost, client_root, out_dir, slow_remote):
    body = """
data = write("out/a.part", 20 * MiB)
os.rename("out/a.part", "out/a.bin")
final["out/a.bin"] = data
"""
    r = run_job(testhost, client_root, body, remote=slow_remote)
    assert_outputs(r, client_root, set())


def test_rename_over_an_existing_output(testhost, client_root, out_dir, slow_remote):
    """Over outputs still on the wire (with another output, with a client file), and
    over a file the client already had. No conflict copy: the job chose to replace."""
    (out_dir / "old.bin").write_bytes(b"the client's version\n")
    (out_dir / "input.txt").write_bytes(b"an input the job renames\n")
    body = """
write("out/a.bin", 20 * MiB)
b = write("out/b.bin", MiB)
os.rename("out/b.bin", "out/a.bin")
write("out/c.bin", 20 * MiB)
os.rename("out/input.txt", "out/c.bin")
new = write("out/new.bin", 3 * MiB)
os.rename("out/new.bin", "out/old.bin")
final["out/a.bin"] = b
final["out/c.bin"] = hashlib.sha256(b"an input the job renames\\n").hexdigest()
final["out/old.bin"] = new
"""
    r = run_job(testhost, client_root, body, remote=slow_remote)
    assert_outputs(r, client_root, set())


def test_file_moved_into_a_directory_made_after_it(testhost, client_root, out_dir, slow_remote):
    body = """
data = write("out/x.bin", 20 * MiB)
os.mkdir("out/later")
os.rename("out/x.bin", "out/later/x.bin")
final["out/later/x.bin"] = data
"""
    r = run_job(testhost, client_root, body, remote=slow_remote)
    assert_outputs(r, client_root, {"later"})


# --------------------------------------------------------------------------- remote disk full


@pytest.fixture
def small_remote_disk(testhost):
    """The remote sessions dir (where the agent spools outputs) on a 16 MiB tmpfs."""
    where = sessions_dir()
    where.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwnam(REMOTE_USER)
    options = f"size=16m,mode=0700,uid={user.pw_uid},gid={user.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
        # the session ended: its directory (on the tmpfs) is gone
        assert wait_until(lambda: not any(where.iterdir()), 10), list(where.iterdir())
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], check=False)


# The job fills the remote disk as a neighbour would (a file beside the sessions), then
# writes its output; the filler is removed at the end.
FILL = """
filler = os.path.expanduser("~/.cache/topyaz-mount/sessions/filler")
try:
    with open(filler, "wb") as f:
        f.write(bytes(64 * MiB))
except OSError:
    pass
"""
UNFILL = "\nos.unlink(filler)\n"


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("topyaz-mount: error:")]


def test_remote_disk_full_never_commits_a_failed_output(testhost, client_root, out_dir,
                                                        small_remote_disk):
    """`echo hello > x.txt` on a full disk returns 0 on the remote; exec must not."""
    (out_dir / "x.txt").write_bytes(b"the client's version\n")
    body = FILL + """
rc = os.system("echo hello > out/x.txt")
final["rc"] = rc
""" + UNFILL
    r = run_job(testhost, client_root, body)
    assert r.returncode == 255, describe(r)
    assert json.loads(r.stdout.decode().strip().splitlines()[-1]) == {"rc": 0}
    lines = error_lines(r)
    assert len(lines) == 1, describe(r)
    assert "out/x.txt" in lines[0] and "not committed" in lines[0], lines[0]
    assert "ENOSPC" in lines[0] and "unchanged" in lines[0], lines[0]
    assert (out_dir / "x.txt").read_bytes() == b"the client's version\n"
    assert tree(out_dir) == {"x.txt"}
    assert temp_files(client_root) == []


def test_remote_disk_full_reaches_the_job_at_fsync_and_close(testhost, client_root, out_dir,
                                                             small_remote_disk):
    """A big output that runs out of room part way (its upload had begun): the job sees
    ENOSPC, the old local file stays, a new one is not created, the status says so."""
    old = os.urandom(3 * MiB)
    (out_dir / "big.bin").write_bytes(old)
    body = """
import errno
for name in ("out/big.bin", "out/new.bin"):
    seen = final[name] = []
    f = open(name, "wb")
    try:
        fill(f, 24 * MiB)
        os.fsync(f.fileno())
    except OSError as e:
        seen.append(errno.errorcode[e.errno])
    try:
        f.close()
    except OSError as e:
        seen.append(errno.errorcode[e.errno])
"""
    r = run_job(testhost, client_root, body)
    assert r.returncode == 255, describe(r)
    seen = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert seen == {name: ["ENOSPC", "ENOSPC"] for name in ("out/big.bin", "out/new.bin")}, seen
    lines = error_lines(r)
    assert len(lines) == 2, describe(r)
    for name, line in zip(("out/big.bin", "out/new.bin"), sorted(lines), strict=True):
        assert name in line and "not committed" in line and "ENOSPC" in line, line
    assert (out_dir / "big.bin").read_bytes() == old
    assert tree(out_dir) == {"big.bin"}
    assert temp_files(client_root) == []


def test_an_output_written_again_once_there_is_room_commits(testhost, client_root, out_dir,
                                                           small_remote_disk):
    """A job that retries after freeing room: its second version lands, exit 0."""
    body = FILL + """
import errno
try:
    write("out/x.bin", 2 * MiB)
    final["first"] = "written"
except OSError as e:
    final["first"] = errno.errorcode[e.errno]
""" + UNFILL + """
final["out/x.bin"] = write("out/x.bin", 2 * MiB)
"""
    r = run_job(testhost, client_root, body)
    assert r.returncode == 0, describe(r)
    report = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert report.pop("first") == "ENOSPC", describe(r)
    assert sha256(out_dir / "x.bin") == report["out/x.bin"]
    assert error_lines(r) == [], describe(r)
    assert tree(out_dir) == {"x.bin"}
    assert temp_files(client_root) == []


def test_remote_disk_full_when_an_output_is_opened_to_append(testhost, client_root, out_dir,
                                                              small_remote_disk):
    """Appending first copies the client's file into the spool; a copy cut short by the
    full disk fails the open and is dropped, so no later open builds on half a file."""
    old = os.urandom(20 * MiB)
    (out_dir / "log.bin").write_bytes(old)
    body = """
import errno
seen = final["seen"] = []
for attempt in range(2):
    try:
        with open("out/log.bin", "ab") as f:
            f.write(b"appended")
        seen.append("appended")
    except OSError as e:
        seen.append(errno.errorcode[e.errno])
with open("out/log.bin", "rb") as f:
    final["size"] = len(f.read())
"""
    r = run_job(testhost, client_root, body)
    assert r.returncode == 0, describe(r)
    report = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert report == {"seen": ["ENOSPC", "ENOSPC"], "size": 20 * MiB}, describe(r)
    assert (out_dir / "log.bin").read_bytes() == old
    assert tree(out_dir) == {"log.bin"}
    assert temp_files(client_root) == []


def test_remote_disk_full_keeps_the_command_status(testhost, client_root, out_dir,
                                                  small_remote_disk):
    """A command that fails on its own keeps its status; the output is still named."""
    (out_dir / "log.txt").write_bytes(b"before\n")
    script = "head -c 30000000 /dev/zero > out/log.txt"
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode not in (0, 255), describe(r)
    lines = error_lines(r)
    assert len(lines) == 1 and "out/log.txt" in lines[0] and "ENOSPC" in lines[0], describe(r)
    assert (out_dir / "log.txt").read_bytes() == b"before\n"
    assert temp_files(client_root) == []


def test_outputs_that_fit_on_a_small_remote_disk_commit(testhost, client_root, out_dir,
                                                       small_remote_disk):
    body = """
for i in range(5):
    final[f"out/f{i}.bin"] = write(f"out/f{i}.bin", MiB)
"""
    r = run_job(testhost, client_root, body)
    assert_outputs(r, client_root, set())
