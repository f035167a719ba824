"""End to end: the persistent content-addressed read cache, through the real CLI.

Each test runs `python -m topyaz_mount.cli exec --stats=json ...` (tests/e2e_util.py)
against the session's test host and checks outcomes only: the `--stats=json` counters
(content_bytes_sent, cache_hits, hashed_bytes, wire_bytes_sent, ...), the command's
output, and the files of the remote store under ~tmremote/.cache/topyaz-mount
(objects/<hex[:2]>/<hex>, tmp/), which root can inspect directly. Never timings.

Every test starts from an empty remote cache (`topyaz-mount cache --clear`) and a fresh
client root, and must leave no FUSE mount of tmremote, no session dir and no file in
the store's tmp/ behind (`no_leftovers`).

The store is shared by every session of tmremote, so a concurrently running suite on
the same machine can add objects; assertions name our objects by their blake3 where
they can.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import blake3
import pytest
from e2e_util import (
    CLI,
    client_env,
    descendants,
    describe,
    pid_alive,
    remote_home,
    run_exec,
    session_agent_pid,
    session_dirs,
    start_exec,
    unmount_lazy,
    wait_until,
    write_random,
)

pytestmark = pytest.mark.e2e

MiB = 1 << 20


# --------------------------------------------------------------------------- remote store


def store_dir() -> Path:
    return remote_home() / ".cache" / "topyaz-mount"


def objects_dir() -> Path:
    return store_dir() / "objects"


def tmp_dir() -> Path:
    return store_dir() / "tmp"


def store_objects() -> dict[str, int]:
    """Object name (hex) -> size, for every object file in the remote store."""
    found: dict[str, int] = {}
    base = objects_dir()
    if not base.is_dir():
        return found
    for sub in base.iterdir():
        if not sub.is_dir():
            continue
        for obj in sub.iterdir():
            with contextlib.suppress(FileNotFoundError):
                found[obj.name] = obj.stat().st_size
    return found


def object_path(hexdigest: str) -> Path:
    return objects_dir() / hexdigest[:2] / hexdigest


def tmp_files() -> list[str]:
    try:
        return sorted(p.name for p in tmp_dir().iterdir())
    except FileNotFoundError:
        return []


def b3_file(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the CLI


def exec_stats(testhost, root: Path, *command, options=(), timeout: float = 90):
    """`exec --stats=json`; returns (CompletedProcess, stats dict)."""
    r = run_exec(testhost, root, *command, options=["--stats=json", *options], timeout=timeout)
    assert r.returncode == 0, describe(r)
    return r, parse_stats(r)


def parse_stats(r: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.startswith("{")]
    assert lines, f"no --stats=json line on stderr:\n{describe(r)}"
    return json.loads(lines[-1])


def remote_sha256(r: subprocess.CompletedProcess) -> str:
    return r.stdout.decode().split()[0]


def cache_cmd(testhost, *args: str) -> dict:
    """`topyaz-mount cache --json [args]` against the test host; returns its JSON."""
    argv = [*CLI, "cache", "--remote", testhost.remote, "-F", str(testhost.ssh_config),
            "--remote-python", testhost.remote_python, "--json", *args]
    r = subprocess.run(argv, env=client_env(), stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, describe(r)
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


# --------------------------------------------------------------------------- fixtures


def _belongs_to_us(session: Path, our_pids: set[int]) -> bool:
    """Ours (or an orphan) unless a live agent of another sshd holds it."""
    pid = session_agent_pid(session)
    if pid is None or not pid_alive(pid):
        return True
    return pid in our_pids


def _temp_is_ours(name: str, our_pids: set[int]) -> bool:
    """A store temp (named <agent pid>-<ns>) is ours unless another live agent writes it."""
    try:
        pid = int(name.split("-")[0])
    except ValueError:
        return True
    return not pid_alive(pid) or pid in our_pids


@pytest.fixture(autouse=True)
def no_leftovers(testhost):
    """After each test: no FUSE mount of tmremote, no session dir, nothing in store tmp/."""
    mounts_before = set(testhost.remote_mounts())
    sessions_before = session_dirs()
    tmp_before = set(tmp_files())
    yield
    found: tuple[list[str], list[str], list[str]] = ([], [], [])

    def clean() -> bool:
        nonlocal found
        ours = descendants(testhost.pid)
        mounts = [m for m in testhost.remote_mounts()
                  if m not in mounts_before and _belongs_to_us(Path(m).parent, ours)]
        sessions = [s for s in session_dirs()
                    if s not in sessions_before and _belongs_to_us(Path(s), ours)]
        temps = [t for t in tmp_files() if t not in tmp_before and _temp_is_ours(t, ours)]
        found = (mounts, sessions, temps)
        return not any(found)

    if wait_until(clean, 3):
        return
    mounts, sessions, temps = found
    for m in mounts:
        unmount_lazy(m)
    for s in sessions:
        shutil.rmtree(s, ignore_errors=True)
    pytest.fail(f"left behind after the test: mounts={mounts} session dirs={sessions} "
                f"store tmp files={temps}", pytrace=False)


@pytest.fixture
def empty_cache(testhost) -> dict:
    """An empty remote cache (through the CLI); returns `cache --clear --json`'s answer."""
    out = cache_cmd(testhost, "--clear")
    # Nothing of a finished session is held, so --clear leaves nothing of ours. (A suite
    # running concurrently may hold objects of its own; those are not ours to judge.)
    return out


@pytest.fixture
def root(client_root) -> Path:
    return client_root


# --------------------------------------------------------------------------- tests


def test_second_run_sends_no_content(testhost, root, empty_cache):
    size = 50 * MiB
    digest = write_random(root / "big.bin", size)
    r1, s1 = exec_stats(testhost, root, "sha256sum", "big.bin")
    assert remote_sha256(r1) == digest
    assert s1["content_bytes_sent"] >= size, s1
    assert s1["cache_hits"] == 0, s1
    assert store_objects().get(b3_file(root / "big.bin")) == size

    r2, s2 = exec_stats(testhost, root, "sha256sum", "big.bin")
    assert r2.stdout == r1.stdout
    assert s2["content_bytes_sent"] == 0, s2
    assert s2["cache_hits"] >= 1, s2
    assert s2["bytes_saved"] >= size, s2
    # measured independently of the content counters: what went through the ssh pipe
    assert s2["wire_bytes_sent"] < 1 * MiB, s2
    assert s2["hashed_bytes"] == 0, s2  # unchanged file: hash from the index


def test_touched_input_is_rehashed_and_changed_input_is_sent(testhost, root, empty_cache):
    size = 20 * MiB
    path = root / "in.bin"
    write_random(path, size)
    r, s = exec_stats(testhost, root, "sha256sum", "in.bin")
    assert remote_sha256(r) == sha256_file(path)

    # mtime only: the client hashes it again, the content is still cached
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    r, s = exec_stats(testhost, root, "sha256sum", "in.bin")
    assert remote_sha256(r) == sha256_file(path)
    assert s["content_bytes_sent"] == 0, s
    assert s["cache_hits"] >= 1, s
    assert s["hashed_bytes"] >= size, s

    # one byte changed: new content, sent whole, and the job sees the change
    old_sha = sha256_file(path)
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        b = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    new_sha = sha256_file(path)
    assert new_sha != old_sha
    r, s = exec_stats(testhost, root, "sha256sum", "in.bin")
    assert remote_sha256(r) == new_sha
    assert s["content_bytes_sent"] >= size, s
    assert s["cache_hits"] == 0, s
    objects = store_objects()
    assert objects.get(b3_file(path)) == size


def test_renamed_and_copied_inputs_are_hits(testhost, root, empty_cache):
    size = 8 * MiB
    digest = write_random(root / "a.bin", size)
    r, s = exec_stats(testhost, root, "sha256sum", "a.bin")
    assert remote_sha256(r) == digest and s["content_bytes_sent"] >= size, s

    os.rename(root / "a.bin", root / "renamed.bin")
    r, s = exec_stats(testhost, root, "sha256sum", "renamed.bin")
    assert remote_sha256(r) == digest
    assert s["content_bytes_sent"] == 0 and s["cache_hits"] >= 1, s
    # a rename changes the ctime, which the hash index also checks (so that in-place
    # edits with a restored mtime are never served stale): re-hashed, still a hit

    (root / "sub").mkdir()
    shutil.copyfile(root / "renamed.bin", root / "sub" / "copy.bin")
    r, s = exec_stats(testhost, root, "sha256sum", "sub/copy.bin")
    assert remote_sha256(r) == digest
    assert s["content_bytes_sent"] == 0 and s["cache_hits"] >= 1, s
    assert s["hashed_bytes"] >= size, s  # a new file: hashed once, then a hit


def test_concurrent_sessions_store_one_object(testhost, root, empty_cache):
    size = 30 * MiB
    digest = write_random(root / "shared.bin", size)
    name = b3_file(root / "shared.bin")
    tmp_before = set(tmp_files())
    procs = [
        start_exec(testhost, root, "sha256sum", "shared.bin", options=["--stats=json"])
        for _ in range(2)
    ]
    try:
        results = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            p.close()
    for r in results:
        assert r.returncode == 0, describe(r)
        assert remote_sha256(r) == digest
    assert wait_until(lambda: set(tmp_files()) <= tmp_before, 3), tmp_files()
    same_size = [h for h, n in store_objects().items() if n == size]
    assert same_size == [name], same_size
    assert b3_file(object_path(name)) == name


def test_corrupted_object_is_detected_and_replaced(testhost, root, empty_cache):
    size = 10 * MiB
    digest = write_random(root / "c.bin", size)
    name = b3_file(root / "c.bin")
    r, s = exec_stats(testhost, root, "sha256sum", "c.bin")
    assert remote_sha256(r) == digest
    obj = object_path(name)
    assert obj.stat().st_size == size

    with open(obj, "r+b") as fh:  # as root: flip one byte, keep the size and owner
        fh.seek(size // 3)
        b = fh.read(1)
        fh.seek(size // 3)
        fh.write(bytes([b[0] ^ 0x01]))
    assert obj.stat().st_size == size and b3_file(obj) != name

    r, s = exec_stats(testhost, root, "sha256sum", "c.bin")
    assert remote_sha256(r) == digest
    assert s["cache_hits"] == 0 and s["content_bytes_sent"] >= size, s
    assert obj.stat().st_size == size
    # the remote's own blake3 says the object is whole again
    check = testhost.run(
        f"python3 -c 'import blake3,sys; print(blake3.blake3(open(sys.argv[1],\"rb\").read())"
        f".hexdigest())' {obj}"
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == name

    r, s = exec_stats(testhost, root, "sha256sum", "c.bin")
    assert remote_sha256(r) == digest
    assert s["content_bytes_sent"] == 0 and s["cache_hits"] >= 1, s


def test_eviction_keeps_the_cache_under_its_cap_lru_first(testhost, root, empty_cache):
    cap = 40 * MiB
    size = 15 * MiB
    names = {}
    for key in "ABCD":
        write_random(root / f"{key}.bin", size)
        names[key] = b3_file(root / f"{key}.bin")

    def run(key: str) -> dict:
        r, s = exec_stats(testhost, root, "sha256sum", f"{key}.bin",
                          options=["--cache-cap", "40M"])
        assert remote_sha256(r) == sha256_file(root / f"{key}.bin")
        objects = store_objects()
        assert sum(objects.values()) <= cap, objects
        assert objects.get(names[key]) == size  # the object just used stays
        return objects

    run("A")
    objects = run("B")
    assert names["A"] in objects
    s = exec_stats(testhost, root, "sha256sum", "A.bin", options=["--cache-cap", "40M"])[1]
    assert s["content_bytes_sent"] == 0, s  # A is now the most recently used
    objects = run("C")
    assert names["B"] not in objects and names["A"] in objects, objects
    objects = run("D")
    assert set(objects) >= {names["C"], names["D"]}
    assert names["A"] not in objects


HOLD_OPEN = r"""
import hashlib, os, time
f = open("a.bin", "rb")
h = hashlib.sha256(f.read(1))
print("ready", flush=True)
deadline = time.monotonic() + 90
while not os.path.exists("go") and time.monotonic() < deadline:
    time.sleep(0.05)
h.update(f.read())
print(h.hexdigest(), flush=True)
"""


def test_object_in_use_is_never_evicted(testhost, root, empty_cache):
    digest_a = write_random(root / "a.bin", 15 * MiB)
    name_a = b3_file(root / "a.bin")
    write_random(root / "b.bin", 2 * MiB)
    write_random(root / "c.bin", 3 * MiB)
    name_c = b3_file(root / "c.bin")
    exec_stats(testhost, root, "sha256sum", "c.bin")  # an object nobody holds
    assert name_c in store_objects()

    with start_exec(testhost, root, "python3", "-c", HOLD_OPEN,
                    options=["--stats=json"]) as holder:
        assert holder.wait_for_stdout(b"ready\n", 60), (holder.stdout, holder.stderr)
        # a.bin is fetched whole in the background and becomes an object the job holds
        assert wait_until(lambda: store_objects().get(name_a) == 15 * MiB, 60)

        r, s = exec_stats(testhost, root, "sha256sum", "b.bin", options=["--cache-cap", "1M"])
        assert remote_sha256(r) == sha256_file(root / "b.bin")
        objects = store_objects()
        assert name_c not in objects, objects  # eviction ran, down toward 1 MiB ...
        assert objects.get(name_a) == 15 * MiB, objects  # ... but skipped the object in use

        out = cache_cmd(testhost, "--clear")
        assert out["objects"] >= 1 and name_a in store_objects()
        assert b3_file(object_path(name_a)) == name_a

        (root / "go").touch()
        r = holder.wait(60)
    assert r.returncode == 0, describe(r)
    assert r.stdout.decode().split() == ["ready", digest_a]


TWO_PHASES = r"""
import hashlib, os, sys, time
def digest(name):
    with open(name, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
print(digest("x.bin"), flush=True)
deadline = time.monotonic() + 90
while not os.path.exists("go") and time.monotonic() < deadline:
    time.sleep(0.05)
print(digest("w.bin"), flush=True)
"""


def test_cap_holds_when_sessions_overlap(testhost, root, empty_cache):
    cap, size = 40 * MiB, 15 * MiB
    names, sums = {}, {}
    for key in "xwyz":
        sums[key] = write_random(root / f"{key}.bin", size)
        names[key] = b3_file(root / f"{key}.bin")
    opts = ["--cache-cap", "40M"]
    with start_exec(testhost, root, "python3", "-c", TWO_PHASES,
                    options=["--stats=json", *opts]) as long_job:
        assert long_job.wait_for_stdout(sums["x"].encode(), 60), (long_job.stdout,
                                                                   long_job.stderr)
        assert wait_until(lambda: names["x"] in store_objects(), 30)
        # two short sessions meanwhile: y, then z, which pushes y out (x is in use)
        exec_stats(testhost, root, "sha256sum", "y.bin", options=opts)
        exec_stats(testhost, root, "sha256sum", "z.bin", options=opts)
        objects = store_objects()
        assert {names["x"], names["z"]} <= set(objects) and names["y"] not in objects
        assert sum(objects.values()) <= cap, objects
        # the long session now stores w: z is not in use and must make room
        (root / "go").touch()
        r = long_job.wait(60)
    assert r.returncode == 0, describe(r)
    assert r.stdout.decode().split() == [sums["x"], sums["w"]]
    objects = store_objects()
    assert names["w"] in objects
    assert sum(objects.values()) <= cap, objects


def test_cache_command_reports_clears_and_prunes(testhost, root, empty_cache):
    # With the store to ourselves the figures are exact (0/1, 1/1, 3 misses ...); another
    # suite using tmremote at the same time can only add to them, so compare by steps.
    assert (empty_cache["hits"], empty_cache["misses"]) == (0, 0), empty_cache
    mine = {}
    for key in "xyz":
        write_random(root / f"{key}.bin", 6 * MiB)
        mine[key] = b3_file(root / f"{key}.bin")

    exec_stats(testhost, root, "sha256sum", "x.bin")
    out1 = cache_cmd(testhost)
    assert store_objects().get(mine["x"]) == 6 * MiB
    assert out1["objects"] >= 1 and out1["bytes"] >= 6 * MiB, out1
    assert out1["misses"] >= 1, out1

    exec_stats(testhost, root, "sha256sum", "x.bin")  # a hit
    out2 = cache_cmd(testhost)
    assert out2["hits"] >= out1["hits"] + 1, (out1, out2)
    assert out2["bytes_saved"] >= out1["bytes_saved"] + 6 * MiB, (out1, out2)
    assert out2["misses"] >= out1["misses"], (out1, out2)
    assert out2["hit_rate"] == pytest.approx(out2["hits"] / (out2["hits"] + out2["misses"]),
                                             abs=1e-4)

    exec_stats(testhost, root, "sh", "-c", 'cat "$1" "$2" > /dev/null', "sh", "y.bin", "z.bin")
    out3 = cache_cmd(testhost, "--cache-cap", "123M")
    assert out3["cap"] == 123 * MiB, out3
    assert set(mine.values()) <= set(store_objects())
    assert out3["objects"] >= 3 and out3["bytes"] >= 18 * MiB, out3
    assert out3["misses"] >= out2["misses"] + 2, (out2, out3)

    out = cache_cmd(testhost, "--prune", "10M")
    assert out["bytes"] <= 10 * MiB, out
    assert out["freed"] >= out3["bytes"] - out["bytes"] >= 8 * MiB, (out3, out)
    left = store_objects()
    # least recently used first: x (used before y and z were stored); y and z were
    # fetched by one job at once (in either order), so one of them goes too
    assert mine["x"] not in left, left
    assert (mine["y"] in left) + (mine["z"] in left) == 1, left

    out = cache_cmd(testhost, "--clear")
    left = store_objects()
    assert not set(mine.values()) & set(left), left
    assert out["objects"] == len(left) and out["bytes"] == sum(left.values()), (out, left)
    assert (out["objects"], out["bytes"]) == (0, 0), out  # nobody else holds an object
    assert (out["hits"], out["misses"], out["bytes_saved"]) == (0, 0, 0), out


def test_directory_batch_second_run_sends_nothing(testhost, root, empty_cache):
    batch = root / "batch"
    batch.mkdir()
    whole = hashlib.sha256()
    total = 0
    for i in range(100):
        data = os.urandom(64 * 1024)
        (batch / f"img{i:03d}.raw").write_bytes(data)
        whole.update(data)
        total += len(data)
    # the directory is an argument, so its files are in the manifest
    script = 'cat "$1"/* | sha256sum'
    r1, s1 = exec_stats(testhost, root, "sh", "-c", script, "sh", "batch")
    assert remote_sha256(r1) == whole.hexdigest()
    assert s1["content_bytes_sent"] >= total, s1
    r2, s2 = exec_stats(testhost, root, "sh", "-c", script, "sh", "batch")
    assert r2.stdout == r1.stdout
    assert s2["content_bytes_sent"] == 0, s2
    assert (s2["cache_hits"], s2["cache_misses"]) == (100, 0), s2
    assert s2["hashed_bytes"] == 0, s2


def test_files_a_remote_glob_finds_are_followed_and_warm_moves_nothing(
    testhost, root, empty_cache
):
    """No argument names the inputs (the remote shell expands the glob): the agent sees
    the job list small/ and open its first .bin, and prefetches the rest in that order."""
    small = root / "small"
    small.mkdir()
    whole = hashlib.sha256()
    for i in range(12):
        data = os.urandom(64 * 1024 + i)
        (small / f"in{i:03d}.bin").write_bytes(data)
        whole.update(data)
    notes = b"not matched by the glob"
    (small / "notes.txt").write_bytes(notes)
    total = sum(p.stat().st_size for p in small.glob("*.bin"))
    r1, s1 = exec_stats(testhost, root, "sh", "-c", "cat small/*.bin | sha256sum")
    assert remote_sha256(r1) == whole.hexdigest()
    assert s1["followed_files"] == 11, s1  # all but the first, and never notes.txt
    assert s1["prefetch_hits"] >= 1, s1
    # Each file once, and notes.txt, which the shell's listing carried (with in000.bin:
    # files up to 64 KiB come inline in a listing the job reads).
    assert s1["content_bytes_sent"] == total + len(notes), s1
    assert s1["files_inlined"] == 2, s1
    assert (s1["cache_hits"], s1["cache_misses"]) == (0, 12), s1
    r2, s2 = exec_stats(testhost, root, "sh", "-c", "cat small/*.bin | sha256sum")
    assert r2.stdout == r1.stdout
    assert s2["content_bytes_sent"] == 0, s2
    assert (s2["cache_hits"], s2["cache_misses"]) == (12, 0), s2
    assert s2["hashed_bytes"] == 0, s2


def test_small_files_a_listing_carries_need_no_open_and_warm_move_nothing(
    testhost, root, empty_cache
):
    """4 KiB sidecars found by a remote glob: the listing carries their content, so the
    job opens none of them through the client; the next run gets them from the store."""
    tiny = root / "tiny"
    tiny.mkdir()
    whole = hashlib.sha256()
    for i in range(40):
        data = os.urandom(4096 - i)
        (tiny / f"s{i:03d}.xmp").write_bytes(data)
        whole.update(data)
    total = sum(p.stat().st_size for p in tiny.iterdir())
    r1, s1 = exec_stats(testhost, root, "sh", "-c", "cat tiny/*.xmp | sha256sum")
    assert remote_sha256(r1) == whole.hexdigest()
    assert s1["files_inlined"] == 40, s1
    assert s1["content_bytes_sent"] == total, s1  # each file once, in the listing
    r2, s2 = exec_stats(testhost, root, "sh", "-c", "cat tiny/*.xmp | sha256sum")
    assert r2.stdout == r1.stdout
    assert s2["files_inlined"] == 0, s2  # the index knows them now: hashes alone
    assert s2["content_bytes_sent"] == 0, s2
    assert (s2["cache_hits"], s2["cache_misses"]) == (40, 0), s2
    # Edited since: the new content arrives, never the stored old one.
    (tiny / "s007.xmp").write_bytes(b"edited")
    r3, s3 = exec_stats(testhost, root, "sh", "-c", "cat tiny/s007.xmp | sha256sum")
    assert remote_sha256(r3) == hashlib.sha256(b"edited").hexdigest()


WALK = r"""
import hashlib, os, sys
h = hashlib.sha256()
for d, ds, fs in os.walk(sys.argv[1]):
    ds.sort()
    for f in sorted(fs):
        with open(os.path.join(d, f), "rb") as fh:
            h.update(fh.read())
print(h.hexdigest())
"""


def test_a_walk_is_followed_one_directory_ahead(testhost, root, empty_cache):
    whole = hashlib.sha256()
    total = 0
    for sub in "abc":
        (root / "tree" / sub).mkdir(parents=True)
        for i in range(6):
            data = os.urandom(64 * 1024)
            (root / "tree" / sub / f"{i}.raw").write_bytes(data)
            whole.update(data)
            total += len(data)
    # -I: Python's import system would list the root (the cwd), and that listing would
    # carry the small sample files there (counted in content_bytes_sent).
    r, s = exec_stats(testhost, root, "sh", "-c", 'exec python3 -I -c "$0" tree', WALK)
    assert r.stdout.decode().split() == [whole.hexdigest()]
    # a: the five after the first; b and c: all six, listed before the job reached them
    assert s["followed_files"] == 17, s
    assert s["content_bytes_sent"] == total, s


def test_content_changed_with_mtime_kept_is_not_served_stale(testhost, root, empty_cache):
    path = root / "photo.raw"
    write_random(path, 4 * MiB)
    r, _ = exec_stats(testhost, root, "sha256sum", "photo.raw")
    assert remote_sha256(r) == sha256_file(path)
    # An in-place edit that keeps size and modification time (exiftool -P
    # -overwrite_original_in_place, touch -r, cp -p over the same inode ...).
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"EDITED")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_ctime_ns != st.st_ctime_ns
    r, _ = exec_stats(testhost, root, "sha256sum", "photo.raw")
    assert remote_sha256(r) == sha256_file(path)


def test_stats_count_the_miss_of_a_new_input(testhost, root, empty_cache):
    # A race the prefetch nearly always wins; a few tries make the outcome certain.
    for i in range(8):
        name = f"new{i}.bin"
        write_random(root / name, MiB)
        r, s = exec_stats(testhost, root, "sha256sum", name)
        assert remote_sha256(r) == sha256_file(root / name)
        assert s["content_bytes_sent"] >= MiB, s
        assert (s["cache_hits"], s["cache_misses"]) == (0, 1), s


def test_concurrent_readers_in_one_job_pull_a_file_once(testhost, root, empty_cache):
    size = 32 * MiB
    for i in range(5):
        name = f"par{i}.bin"
        digest = write_random(root / name, size)
        # the name is inside the script, so no manifest: the job's own opens race
        script = f"for n in 1 2 3 4; do sha256sum {name} & done; wait"
        r, s = exec_stats(testhost, root, "sh", "-c", script)
        assert r.stdout.decode().split()[::2] == [digest] * 4
        assert s["content_bytes_sent"] == size, s
        assert s["cache_misses"] == 1, s


def test_large_input_read_out_of_order_is_cached(testhost, root, empty_cache):
    size = 80 * MiB  # over QUICK_HASH_LIMIT; not in argv, so not in the manifest either
    digest = write_random(root / "video.bin", size)
    script = "tail -c 4 video.bin > /dev/null && sha256sum video.bin"
    r, s = exec_stats(testhost, root, "sh", "-c", script)
    assert remote_sha256(r) == digest
    assert s["content_bytes_sent"] >= size, s
    assert b3_file(root / "video.bin") in store_objects()  # the remote did store it
    r, s = exec_stats(testhost, root, "sh", "-c", script)
    assert remote_sha256(r) == digest
    assert s["content_bytes_sent"] == 0 and s["cache_hits"] >= 1, s


def test_an_output_read_by_the_next_job_moves_no_content(testhost, root, empty_cache):
    """Chained jobs: what job 1 wrote is in the remote store, so job 2 pulls nothing,
    and the client already knows its hash (it verified it when committing)."""
    size = 12 * MiB
    write = f"head -c {size} /dev/urandom > stage1.bin"
    exec_stats(testhost, root, "sh", "-c", write)
    local = hashlib.sha256((root / "stage1.bin").read_bytes()).hexdigest()
    r, s = exec_stats(testhost, root, "sha256sum", "stage1.bin")
    assert remote_sha256(r) == local
    assert s["content_bytes_sent"] == 0 and s["cache_hits"] >= 1, s
    assert s["hashed_bytes"] == 0, s


def test_big_unhashed_input_streams_at_once_and_is_hashed_meanwhile(
    testhost, root, empty_cache, tmp_path, monkeypatch
):
    """A big input the client never hashed (not named in argv, or a new client index)
    starts streaming at once; the client hashes it meanwhile and tells the agent, which
    switches to its stored copy when it has one. Either way the bytes are right and the
    next run is a pure hit."""
    size = 200 * MiB
    digest = write_random(root / "video.bin", size)
    script = "sha256sum < video.bin"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "index-a"))
    r, s = exec_stats(testhost, root, "sh", "-c", script)  # the store learns it
    assert remote_sha256(r) == digest
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "index-b"))  # a client that never hashed it
    r, s = exec_stats(testhost, root, "sh", "-c", script)
    assert remote_sha256(r) == digest
    assert s["content_bytes_sent"] + s["bytes_saved"] >= size, s
    r, s = exec_stats(testhost, root, "sh", "-c", script)  # index-b knows it now
    assert remote_sha256(r) == digest
    assert s["content_bytes_sent"] == 0 and s["cache_hits"] >= 1, s
