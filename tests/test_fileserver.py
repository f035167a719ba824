"""fileserver.py: the agent's requests answered inside the jail, and atomic commits."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from pathlib import Path

import blake3
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from topyaz_mount.client.fileserver import TEMP_MARK, FileServer, attr_of
from topyaz_mount.client.jail import JailError
from topyaz_mount.wire import proto

pytestmark = pytest.mark.both_os_calls


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the client's hash index (platformdirs' cache dir) out of the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def call(server: FileServer, req):
    return trio.run(server.handle, req)


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def temps(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if TEMP_MARK.decode() in n]


def all_temps(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if TEMP_MARK.decode() in n]
    return found


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    (root / "in.jpg").write_bytes(b"input bytes")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.symlink("../outside", root / "dirlink")
    os.symlink("../outside/secret", root / "filelink")
    server = FileServer(root)
    yield server, root, outside
    server.close()
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"


def commit(
    server,
    cid,
    path,
    data,
    *,
    mode=0o644,
    expect=None,
    check=False,
    chunk=7,
    mtime_ns=None,
    size=None,
    hash_=None,
):
    call(server, proto.CommitBegin(cid, path, mode, expect, check))
    for off in range(0, len(data), chunk):
        server.handle_chunk(proto.CommitChunk(cid, off, data[off : off + chunk]))
    return call(
        server,
        proto.CommitEnd(
            cid,
            len(data) if size is None else size,
            digest(data) if hash_ is None else hash_,
            mtime_ns,
        ),
    )


# --- commits -------------------------------------------------------------------------


def test_good_commit_lands_with_bytes_mode_and_mtime(world):
    server, root, _ = world
    data = bytes(range(256)) * 100
    res = commit(server, 1, b"out/a.png", data, mode=0o640, mtime_ns=1_600_000_000_123_456_789)
    assert isinstance(res, proto.Committed)
    assert res.path == b"out/a.png"
    dest = root / "out" / "a.png"
    assert dest.read_bytes() == data
    st_ = os.stat(dest)
    assert stat.S_IMODE(st_.st_mode) == 0o640
    assert st_.st_mtime_ns == 1_600_000_000_123_456_789
    now = attr_of(os.lstat(dest))
    assert (res.attr.mode, res.attr.size, res.attr.mtime_ns, res.attr.ctime_ns) == (
        now.mode,
        now.size,
        now.mtime_ns,
        now.ctime_ns,
    )
    assert temps(root / "out") == []
    assert server.committed == [b"out/a.png"]
    assert server.stats.files_committed == 1
    assert server.stats.bytes_committed == len(data)


@pytest.mark.parametrize("mode", [0o600, 0o755, 0o444, 0o100640])
def test_commit_mode_is_exact_and_ignores_umask_and_type_bits(world, mode):
    server, root, _ = world
    old = os.umask(0o077)
    try:
        commit(server, 1, b"m", b"x", mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(root / "m").st_mode) == mode & 0o7777
    assert stat.S_ISREG(os.stat(root / "m").st_mode)


def test_empty_commit(world):
    server, root, _ = world
    res = commit(server, 1, b"empty", b"")
    assert res.path == b"empty" and (root / "empty").read_bytes() == b""


def test_commit_is_atomic_replacement(world):
    """Until CommitEnd the old content is there; a reader holding it keeps it."""
    server, root, _ = world
    dest = root / "out" / "a.png"
    dest.write_bytes(b"old")
    old_ino = os.stat(dest).st_ino
    with open(dest, "rb") as reader:
        call(server, proto.CommitBegin(5, b"out/a.png", 0o644))
        new = b"new content" * 1000
        server.handle_chunk(proto.CommitChunk(5, 0, new))
        assert dest.read_bytes() == b"old"
        # the temp file is unnamed (O_TMPFILE) or hidden, private and beside the destination
        for tname in temps(root / "out"):
            assert tname.startswith(".a.png")
            assert stat.S_IMODE(os.stat(root / "out" / tname).st_mode) == 0o600
        call(server, proto.CommitEnd(5, len(new), digest(new)))
        assert reader.read() == b"old"
    assert dest.read_bytes() == new
    assert os.stat(dest).st_ino != old_ino
    assert temps(root / "out") == []


def test_commit_with_big_chunks(world):
    server, root, _ = world
    data = os.urandom(3 * proto.CHUNK_SIZE + 17)
    commit(server, 1, b"big.bin", data, chunk=proto.CHUNK_SIZE)
    assert (root / "big.bin").read_bytes() == data


@pytest.mark.parametrize(
    "bad",
    [
        {"hash_": b"\x00" * 32},
        {"hash_": b""},
        {"size": 12},
        {"size": 0},
        {"size": 10**12},
    ],
    ids=["wrong-hash", "empty-hash", "short-size", "zero-size", "huge-size"],
)
def test_bad_commit_changes_nothing_and_leaves_no_temp(world, bad):
    server, root, _ = world
    dest = root / "out" / "a.png"
    dest.write_bytes(b"previous")
    before = os.stat(dest)
    with pytest.raises(OSError) as e:
        commit(server, 1, b"out/a.png", b"the new output", **bad)
    assert e.value.errno == errno.EIO
    assert dest.read_bytes() == b"previous"
    assert os.stat(dest).st_ino == before.st_ino
    assert os.stat(dest).st_mtime_ns == before.st_mtime_ns
    assert all_temps(root) == []
    assert server.committed == []
    # the commit id is gone
    with pytest.raises(OSError) as e:
        call(server, proto.CommitEnd(1, 0, digest(b"")))
    assert e.value.errno == errno.EBADF


def test_bad_commit_to_new_file_creates_nothing(world):
    server, root, _ = world
    with pytest.raises(OSError):
        commit(server, 1, b"out/new.png", b"data", hash_=digest(b"other"))
    assert os.listdir(root / "out") == []


@pytest.mark.parametrize("offsets", [[0, 0], [0, 10], [3], [0, 5, 4]])
def test_chunks_out_of_order_fail_the_commit(world, offsets):
    server, root, _ = world
    call(server, proto.CommitBegin(1, b"x", 0o644))
    for off in offsets:
        server.handle_chunk(proto.CommitChunk(1, off, b"abcde"))
    with pytest.raises(OSError) as e:
        call(server, proto.CommitEnd(1, 5 * len(offsets), digest(b"abcde" * len(offsets))))
    assert e.value.errno == errno.EIO
    assert not (root / "x").exists()
    assert all_temps(root) == []


def test_abort_removes_the_temp_file(world):
    server, root, _ = world
    (root / "out" / "a.png").write_bytes(b"keep")
    call(server, proto.CommitBegin(3, b"out/a.png", 0o644))
    server.handle_chunk(proto.CommitChunk(3, 0, b"partial"))
    assert len(temps(root / "out")) <= 1  # 0 where the temp file is unnamed (O_TMPFILE)
    assert call(server, proto.CommitAbort(3)) == proto.Done()
    assert temps(root / "out") == []
    assert (root / "out" / "a.png").read_bytes() == b"keep"
    # aborting again, or an unknown commit, is harmless; late chunks are dropped
    assert call(server, proto.CommitAbort(3)) == proto.Done()
    server.handle_chunk(proto.CommitChunk(3, 7, b"late"))
    with pytest.raises(OSError):
        call(server, proto.CommitEnd(3, 7, digest(b"partial")))


def test_commit_lands_where_its_end_says_after_its_directory_moved(world):
    """The job renamed the directory while the output was on the wire."""
    server, root, _ = world
    (root / "out" / "d1").mkdir()
    data = b"renamed while on the wire"
    call(server, proto.CommitBegin(1, b"out/d1/r.bin", 0o644, None, True))
    server.handle_chunk(proto.CommitChunk(1, 0, data))
    call(server, proto.Rename(b"out/d1", b"out/d2"))
    res = call(server, proto.CommitEnd(1, len(data), digest(data), None, b"out/d2/r.bin"))
    assert res.path == b"out/d2/r.bin"
    assert (root / "out" / "d2" / "r.bin").read_bytes() == data
    assert sorted(os.listdir(root / "out")) == ["d2"]
    assert os.listdir(root / "out" / "d2") == ["r.bin"]


@pytest.mark.parametrize(
    "path", [b"../escape", b"/tmp/escape", b"", b"out/../../escape", b"dirlink/escape"]
)
def test_commit_end_path_stays_in_the_jail(world, path):
    server, root, _ = world
    call(server, proto.CommitBegin(1, b"out/a", 0o644))
    server.handle_chunk(proto.CommitChunk(1, 0, b"x"))
    with pytest.raises(OSError):
        call(server, proto.CommitEnd(1, 1, digest(b"x"), None, path))
    assert all_temps(root) == []
    assert os.listdir(root / "out") == []
    assert not (root.parent / "escape").exists()  # (the world fixture checks outside/)


def test_close_removes_temp_files_of_unfinished_commits(tmp_path):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    server = FileServer(root)
    call(server, proto.CommitBegin(1, b"a", 0o644))
    call(server, proto.CommitBegin(2, b"d/b", 0o644))
    server.handle_chunk(proto.CommitChunk(2, 0, b"half"))
    commit(server, 3, b"done", b"complete")
    assert len(all_temps(root)) in (0, 2)  # 0 where temp files are unnamed (O_TMPFILE)
    server.close()
    assert all_temps(root) == []
    assert sorted(os.listdir(root)) == ["d", "done"]
    assert os.listdir(root / "d") == []
    assert (root / "done").read_bytes() == b"complete"


@pytest.mark.parametrize("finish", ["close", "end"])
def test_no_temp_file_left_when_the_directory_was_renamed(tmp_path, finish):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    server = FileServer(root)
    try:
        call(server, proto.CommitBegin(1, b"out/a.png", 0o644))
        server.handle_chunk(proto.CommitChunk(1, 0, b"data"))
        call(server, proto.Rename(b"out", b"moved"))
        if finish == "end":
            try:
                call(server, proto.CommitEnd(1, 4, digest(b"data")))
            except OSError:
                pass
    finally:
        server.close()
    assert all_temps(root) == []


def test_listings_hide_temp_files(world):
    server, root, _ = world
    # a named temp file, as on file systems without O_TMPFILE
    (root / "out" / ".a.png.tmcommit-0123456789ab").write_bytes(b"x")
    (root / ".b.png.tmcommit-0123456789ab").write_bytes(b"x")
    names = {e.name for e in call(server, proto.ListDir(b"out")).entries}
    assert names == set()
    names = {e.name for e in call(server, proto.ListDir(b"")).entries}
    assert names == {b"out", b"in.jpg", b"dirlink", b"filelink"}


def test_commit_id_in_use(world):
    server, root, _ = world
    call(server, proto.CommitBegin(1, b"a", 0o644))
    with pytest.raises(OSError) as e:
        call(server, proto.CommitBegin(1, b"b", 0o644))
    assert e.value.errno == errno.EEXIST
    server.handle_chunk(proto.CommitChunk(1, 0, b"A"))
    call(server, proto.CommitEnd(1, 1, digest(b"A")))
    assert (root / "a").read_bytes() == b"A"
    assert not (root / "b").exists()
    assert all_temps(root) == []


def test_interleaved_commits(world):
    server, root, _ = world
    datas = {i: os.urandom(100 + i) for i in range(1, 6)}
    for i in datas:
        call(server, proto.CommitBegin(i, b"f%d" % i, 0o644))
    for off in range(0, 110, 10):
        for i, d in datas.items():
            if off < len(d):
                server.handle_chunk(proto.CommitChunk(i, off, d[off : off + 10]))
    for i, d in reversed(datas.items()):
        call(server, proto.CommitEnd(i, len(d), digest(d)))
    for i, d in datas.items():
        assert (root / f"f{i}").read_bytes() == d


# --- conflicts -----------------------------------------------------------------------


def test_conflict_saves_output_beside_and_leaves_local_file_untouched(world):
    server, root, _ = world
    dest = root / "out" / "a.png"
    dest.write_bytes(b"v1")
    seen = attr_of(os.lstat(dest))
    call(server, proto.CommitBegin(1, b"out/a.png", 0o644, seen, True))
    server.handle_chunk(proto.CommitChunk(1, 0, b"remote output"))
    dest.write_bytes(b"local edit during the job")  # changed behind the agent's back
    local = os.stat(dest)
    res = call(server, proto.CommitEnd(1, 13, digest(b"remote output")))
    assert res.path == b"out/a.remote-conflict.png"
    assert (root / "out" / "a.remote-conflict.png").read_bytes() == b"remote output"
    assert dest.read_bytes() == b"local edit during the job"
    assert os.stat(dest).st_mtime_ns == local.st_mtime_ns
    assert res.attr.size == 13
    assert server.committed == [b"out/a.remote-conflict.png"]
    assert all_temps(root) == []


def test_conflict_when_a_file_appears_that_the_agent_thought_absent(world):
    server, root, _ = world
    call(server, proto.CommitBegin(1, b"new.txt", 0o644, None, True))
    (root / "new.txt").write_bytes(b"made locally")
    res = call(server, proto.CommitEnd(1, 0, digest(b"")))
    assert res.path == b"new.remote-conflict.txt"
    assert (root / "new.txt").read_bytes() == b"made locally"


def test_conflict_when_the_file_was_deleted_locally(world):
    server, root, _ = world
    dest = root / "gone.txt"
    dest.write_bytes(b"x")
    seen = attr_of(os.lstat(dest))
    call(server, proto.CommitBegin(1, b"gone.txt", 0o644, seen, True))
    dest.unlink()
    res = call(server, proto.CommitEnd(1, 0, digest(b"")))
    assert res.path == b"gone.remote-conflict.txt"
    assert not dest.exists()


def test_no_conflict_when_unchanged_or_unchecked(world):
    server, root, _ = world
    dest = root / "a.txt"
    dest.write_bytes(b"v1")
    seen = attr_of(os.lstat(dest))
    assert commit(server, 1, b"a.txt", b"v2", expect=seen, check=True).path == b"a.txt"
    assert dest.read_bytes() == b"v2"
    # absent then, absent now
    assert commit(server, 2, b"b.txt", b"b", expect=None, check=True).path == b"b.txt"
    # changed, but the agent did not ask for a check
    call(server, proto.CommitBegin(3, b"a.txt", 0o644, seen, False))
    dest.write_bytes(b"local change")
    server.handle_chunk(proto.CommitChunk(3, 0, b"v3"))
    assert call(server, proto.CommitEnd(3, 2, digest(b"v3"))).path == b"a.txt"
    assert dest.read_bytes() == b"v3"


@pytest.mark.parametrize(
    ("path", "alt"),
    [
        (b"a.png", b"a.remote-conflict.png"),
        (b"d/clip.tar.gz", b"d/clip.tar.remote-conflict.gz"),
        (b"README", b"README.remote-conflict"),
        (b".notes", b".notes.remote-conflict"),  # .bashrc would be refused (policy)
        (b"x.", b"x.remote-conflict."),
    ],
)
def test_conflict_names(tmp_path, path, alt):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    server = FileServer(root)
    try:
        (root / os.fsdecode(path)).write_bytes(b"local")
        call(server, proto.CommitBegin(1, path, 0o644, None, True))
        res = call(server, proto.CommitEnd(1, 0, digest(b"")))
        assert res.path == alt
        assert (root / os.fsdecode(path)).read_bytes() == b"local"
        assert (root / os.fsdecode(alt)).read_bytes() == b""
    finally:
        server.close()


def test_conflict_on_a_long_name_still_saves_the_output(world):
    server, root, _ = world
    name = b"x" * 246 + b".png"  # 250 bytes: valid
    (root / os.fsdecode(name)).write_bytes(b"local")
    call(server, proto.CommitBegin(1, name, 0o644, None, True))
    server.handle_chunk(proto.CommitChunk(1, 0, b"remote"))
    res = call(server, proto.CommitEnd(1, 6, digest(b"remote")))
    assert res.path != name
    assert (root / os.fsdecode(res.path)).read_bytes() == b"remote"
    assert (root / os.fsdecode(name)).read_bytes() == b"local"


# --- commits that try to leave the root ----------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"dirlink/x",
        b"dirlink/secret",
        b"../outside/x",
        b"/tmp/x",
        b"",
        b"out/../../x",
        b"a/./b",
        b"out//x",
        b"out/\x00",
    ],
)
def test_commit_outside_is_refused(world, path):
    server, root, outside = world
    with pytest.raises(JailError):
        call(server, proto.CommitBegin(1, path, 0o644))
    assert all_temps(root) == []
    # the `world` fixture checks that nothing appeared outside


def test_commit_over_a_symlink_replaces_the_link_not_its_target(world):
    server, root, outside = world
    res = commit(server, 1, b"filelink", b"replaced")
    assert res.path == b"filelink"
    assert not os.path.islink(root / "filelink")
    assert (root / "filelink").read_bytes() == b"replaced"
    assert (outside / "secret").read_bytes() == b"secret"


def test_commit_into_missing_directory_fails_cleanly(world):
    server, root, _ = world
    with pytest.raises(FileNotFoundError):
        call(server, proto.CommitBegin(1, b"nodir/x", 0o644))
    assert all_temps(root) == []
    assert not (root / "nodir").exists()


# --- other requests ------------------------------------------------------------------


def test_read_path(world):
    server, root, _ = world
    opened = call(server, proto.OpenRead(b"in.jpg"))
    assert isinstance(opened, proto.Opened)
    assert opened.attr.size == len(b"input bytes")
    if getattr(opened, "blake3", None) is not None:
        assert opened.blake3 == digest(b"input bytes")
    h = opened.handle
    assert call(server, proto.ReadChunk(h, 0, 5)) == proto.Data(b"input")
    assert call(server, proto.ReadChunk(h, 6, 100)) == proto.Data(b"bytes")
    assert call(server, proto.ReadChunk(h, 100, 10)) == proto.Data(b"")
    for bad in (
        proto.ReadChunk(h, -1, 1),
        proto.ReadChunk(h, 0, -1),
        proto.ReadChunk(h, 0, 4 * proto.CHUNK_SIZE + 1),
    ):
        with pytest.raises(OSError) as e:
            call(server, bad)
        assert e.value.errno == errno.EINVAL
    assert call(server, proto.CloseRead(h)) == proto.Done()
    assert call(server, proto.CloseRead(h)) == proto.Done()
    with pytest.raises(OSError) as e:
        call(server, proto.ReadChunk(h, 0, 1))
    assert e.value.errno == errno.EBADF
    assert server.stats.files_opened == 1
    assert server.stats.bytes_read == 10


def test_handles_are_distinct(world):
    server, root, _ = world
    (root / "b").write_bytes(b"BBB")
    h1 = call(server, proto.OpenRead(b"in.jpg")).handle
    h2 = call(server, proto.OpenRead(b"b")).handle
    assert h1 != h2
    assert call(server, proto.ReadChunk(h2, 0, 3)).data == b"BBB"
    assert call(server, proto.ReadChunk(h1, 0, 5)).data == b"input"


def test_reads_refused_outside(world):
    server, *_ = world
    for path in (b"filelink", b"dirlink/secret", b"../outside/secret", b"/etc/passwd"):
        with pytest.raises(OSError):
            call(server, proto.OpenRead(path))
    assert stat.S_ISLNK(call(server, proto.Stat(b"filelink")).attr.mode)
    assert call(server, proto.ReadLink(b"filelink")) == proto.LinkTarget(b"../outside/secret")
    with pytest.raises(JailError):
        call(server, proto.ListDir(b"dirlink"))


def test_namespace_requests(world):
    server, root, _ = world
    res = call(server, proto.Mkdir(b"newdir", 0o750))
    assert isinstance(res, proto.AttrReply) and stat.S_ISDIR(res.attr.mode)
    assert call(server, proto.Rename(b"in.jpg", b"newdir/in.jpg")) == proto.Done()
    assert (root / "newdir" / "in.jpg").read_bytes() == b"input bytes"
    (root / "other").write_bytes(b"o")
    with pytest.raises(OSError) as e:
        call(server, proto.Rename(b"other", b"newdir/in.jpg", noreplace=True))
    assert e.value.errno == errno.EEXIST
    res = call(server, proto.SetAttr(b"newdir/in.jpg", 0o600, None, 42_000_000_000))
    assert stat.S_IMODE(res.attr.mode) == 0o600 and res.attr.mtime_ns == 42_000_000_000
    res = call(server, proto.SetAttr(b"newdir/in.jpg"))
    assert res.attr.mtime_ns == 42_000_000_000
    res = call(server, proto.Symlink(b"newdir/ln", b"in.jpg"))
    assert stat.S_ISLNK(res.attr.mode)
    assert call(server, proto.Unlink(b"newdir/ln")) == proto.Done()
    assert call(server, proto.Unlink(b"newdir/in.jpg")) == proto.Done()
    assert call(server, proto.Rmdir(b"newdir")) == proto.Done()
    assert not (root / "newdir").exists()
    fs = call(server, proto.StatFs())
    assert isinstance(fs, proto.FsStats) and fs.name_max >= 255


def test_unserved_request_is_enosys(world):
    server, *_ = world
    for req in (proto.Hello(1, "s"), proto.Bye(), proto.Run(1, ["ls"], "/")):
        with pytest.raises(OSError) as e:
            call(server, req)
        assert e.value.errno == errno.ENOSYS


def test_special_files_are_not_served(world):
    server, root, _ = world
    os.mkfifo(root / "fifo")
    assert b"fifo" not in {e.name for e in call(server, proto.ListDir(b"")).entries}
    with pytest.raises(OSError):
        call(server, proto.Stat(b"fifo"))
    with pytest.raises(OSError):
        call(server, proto.OpenRead(b"fifo"))


# --- property: any data, any chunking, lands intact ------------------------------------


@settings(database=None, deadline=None, max_examples=40)
@given(st.binary(max_size=5000), st.integers(1, 700), st.integers(0, 0o777))
def test_commit_round_trip(data, chunk, mode):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = FileServer(root)
        try:
            res = commit(server, 9, b"f.bin", data, chunk=chunk, mode=mode)
            assert res.path == b"f.bin"
            assert (root / "f.bin").read_bytes() == data
            assert stat.S_IMODE(os.stat(root / "f.bin").st_mode) == mode
            h = call(server, proto.OpenRead(b"f.bin")).handle
            back = b""
            while piece := call(server, proto.ReadChunk(h, len(back), 1000)).data:
                back += piece
            assert back == data
            assert all_temps(root) == []
        finally:
            server.close()


# --- property: no request sequence touches anything outside the root ---------------------

PATHS = st.sampled_from(
    [
        b"a",
        b"out/a",
        b"out",
        b"in.jpg",
        b"dirlink",
        b"dirlink/x",
        b"dirlink/secret",
        b"filelink",
        b"../outside/secret",
        b"/tmp/x",
        b"out/../../outside/x",
        b"",
    ]
)
REQUESTS = st.one_of(
    st.builds(proto.Stat, PATHS),
    st.builds(proto.ListDir, PATHS),
    st.builds(proto.OpenRead, PATHS),
    st.builds(proto.Mkdir, PATHS, st.just(0o755)),
    st.builds(proto.Rmdir, PATHS),
    st.builds(proto.Unlink, PATHS),
    st.builds(proto.Rename, PATHS, PATHS, st.booleans()),
    st.builds(proto.SetAttr, PATHS, st.sampled_from([None, 0o777]), st.just(None), st.just(0)),
    st.builds(proto.Symlink, PATHS, st.sampled_from([b"../outside", b"/etc", b"in.jpg"])),
    st.builds(proto.ReadLink, PATHS),
    # a whole commit, possibly with a wrong hash, or left unfinished
    st.tuples(
        st.just("commit"), PATHS, st.binary(max_size=20), st.sampled_from(["ok", "bad", "open"])
    ),
)


@settings(database=None, deadline=None, max_examples=60)
@given(st.lists(REQUESTS, min_size=1, max_size=10))
def test_no_request_touches_anything_outside_the_root(reqs):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "root"
        (root / "out").mkdir(parents=True)
        (root / "in.jpg").write_bytes(b"input")
        outside = base / "outside"
        outside.mkdir()
        (outside / "secret").write_bytes(b"secret")
        os.symlink("../outside", root / "dirlink")
        os.symlink("../outside/secret", root / "filelink")

        def outside_state():
            return sorted(
                (str(p), p.read_bytes() if p.is_file() else None, os.lstat(p).st_mtime_ns)
                for p in [base, outside, *outside.rglob("*")]
            ), sorted(os.listdir(base))

        before = outside_state()
        server = FileServer(root)
        cid = 0
        try:
            for req in reqs:
                try:
                    if isinstance(req, tuple):
                        _, path, data, how = req
                        cid += 1
                        call(server, proto.CommitBegin(cid, path, 0o644))
                        server.handle_chunk(proto.CommitChunk(cid, 0, data))
                        if how != "open":
                            good = digest(data) if how == "ok" else digest(data + b"!")
                            call(server, proto.CommitEnd(cid, len(data), good))
                    else:
                        res = call(server, req)
                        if isinstance(res, proto.Opened):
                            call(server, proto.CloseRead(res.handle))
                except OSError:
                    pass
                assert outside_state() == before, req
        finally:
            server.close()
        assert outside_state() == before


# --- what the session did itself (the watcher's echo filter) ---------------------------


def test_own_commits_renames_and_deletes_are_echoes(world):
    server, root, _ = world
    commit(server, 1, b"out/a.png", b"remote output")
    call(server, proto.Mkdir(b"made", 0o755))
    commit(server, 2, b"made/b.png", b"more")  # moves made/'s mtime: still our echo
    call(server, proto.Rename(b"out/a.png", b"out/c.png"))
    call(server, proto.Unlink(b"made/b.png"))
    for path in (b"out/a.png", b"out/c.png", b"made", b"made/b.png"):
        assert server.is_echo(path), path
    assert server.is_echo(b"out/.c.png" + TEMP_MARK + b"0123")
    assert server.is_echo(b"out/#123456")  # the kernel's name for an unlinked O_TMPFILE


def test_user_changes_after_ours_are_not_echoes(world):
    server, root, _ = world
    commit(server, 1, b"out/a.png", b"remote output")
    (root / "out" / "a.png").write_bytes(b"edited locally, longer")
    assert not server.is_echo(b"out/a.png")
    call(server, proto.Unlink(b"in.jpg"))
    (root / "in.jpg").write_bytes(b"recreated")
    assert not server.is_echo(b"in.jpg")
    (root / "new.txt").write_bytes(b"never touched by the agent")
    assert not server.is_echo(b"new.txt")
    (root / "#42").write_bytes(b"a user's file with a tmpfile-like name")
    assert not server.is_echo(b"#42")


def test_old_records_are_forgotten(world):
    server, _, _ = world
    call(server, proto.Mkdir(b"made", 0o755))
    server.forget_made(older_than=0)
    assert server.made == {}


def test_a_file_changed_in_place_while_read_fails_instead_of_mixing(world):
    server, root, _ = world
    opened = call(server, proto.OpenRead(b"in.jpg"))
    assert call(server, proto.ReadChunk(opened.handle, 0, 5)).data == b"input"
    with open(root / "in.jpg", "r+b") as f:
        f.write(b"INPUT bytes, and more")
    with pytest.raises(OSError) as e:
        call(server, proto.ReadChunk(opened.handle, 5, 6))
    assert e.value.errno == errno.ESTALE


# --- small files inline in listings -----------------------------------------------------

ASK = 1 << 20  # what the agent asks of a listing the job goes through


def test_a_listing_for_lookups_carries_no_content(world):
    server, root, _ = world
    (root / "out" / "a.xmp").write_bytes(b"sidecar")
    entries = call(server, proto.ListDir(b"out")).entries
    assert [(e.name, e.data) for e in entries] == [(b"a.xmp", None)]
    assert server.stats.bytes_read == 0


def test_a_listing_carries_small_files_the_client_had_not_hashed(world):
    server, root, _ = world
    small = os.urandom(3000)
    (root / "out" / "a.xmp").write_bytes(small)
    (root / "out" / "big.bin").write_bytes(os.urandom(200 << 10))  # past INLINE_FILE_MAX
    (root / "out" / "empty").write_bytes(b"")
    entries = {e.name: e for e in call(server, proto.ListDir(b"out", ASK)).entries}
    assert entries[b"a.xmp"].data == small
    assert entries[b"a.xmp"].blake3 == digest(small)
    assert entries[b"empty"].data == b""
    assert entries[b"big.bin"].data is None
    assert server.stats.files_inlined == 2
    assert server.stats.bytes_read == len(small)
    # Listed again: the index knows them now, so the hashes go alone (the warm case).
    again = {e.name: e for e in call(server, proto.ListDir(b"out", ASK)).entries}
    assert again[b"a.xmp"].data is None
    assert again[b"a.xmp"].blake3 == digest(small)
    assert server.stats.bytes_read == len(small)


def test_inline_content_stops_at_the_listing_budget(world, monkeypatch):
    from topyaz_mount.client import fileserver

    monkeypatch.setattr(fileserver, "INLINE_LISTING_MAX", 10_000)  # the agent asks more
    server, root, _ = world
    for i in range(5):
        (root / "out" / f"{i}.txt").write_bytes(bytes([i]) * 3000)
    entries = call(server, proto.ListDir(b"out", ASK)).entries
    carried = [e.name for e in entries if e.data is not None]
    assert carried == [b"0.txt", b"1.txt", b"2.txt"]  # in name order, 9,000 of 10,000 bytes
    assert all(e.data == bytes([int(e.name[:1])]) * 3000 for e in entries if e.data is not None)


def test_inline_content_never_includes_hidden_or_outside_files(world):
    server, root, _ = world
    (root / ".ssh").mkdir()
    (root / ".ssh" / "id_ed25519").write_bytes(b"private key")
    entries = {e.name: e for e in call(server, proto.ListDir(b"", ASK)).entries}
    assert b".ssh" not in entries  # hidden by the policy
    assert entries[b"filelink"].data is None  # a symlink to outside the root: never read
    assert entries[b"in.jpg"].data == b"input bytes"


# --- big chunks written in a thread (receive_chunk) -------------------------------------


def test_big_chunks_written_in_a_thread_land_whole(world):
    server, root, _ = world
    data = os.urandom(3 << 20) + b"tail"

    async def body():
        await server.handle(proto.CommitBegin(1, b"out/big.bin", 0o644))
        for off in range(0, len(data), 1 << 20):
            await server.receive_chunk(proto.CommitChunk(1, off, data[off : off + (1 << 20)]))
        return await server.handle(proto.CommitEnd(1, len(data), digest(data), None))

    trio.run(body)
    assert (root / "out" / "big.bin").read_bytes() == data
    assert all_temps(root) == []


def test_an_abort_while_a_thread_writes_closes_after_it(world, monkeypatch):
    """The session ends (or the agent aborts) while a chunk is being written: the fd
    is not closed under the writing thread, and nothing is left once it returns."""
    from topyaz_mount.client import fileserver

    server, root, _ = world
    started, release = threading.Event(), threading.Event()
    write = fileserver._write_and_hash

    def slow_write(fd, hasher, data):
        started.set()
        release.wait(10)
        write(fd, hasher, data)

    monkeypatch.setattr(fileserver, "_write_and_hash", slow_write)
    fds_before = len(os.listdir("/proc/self/fd"))

    async def body():
        await server.handle(proto.CommitBegin(1, b"out/big.bin", 0o644))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_chunk, proto.CommitChunk(1, 0, b"x" * (1 << 20)))
            await trio.to_thread.run_sync(started.wait)
            assert await server.handle(proto.CommitAbort(1)) == proto.Done()
            release.set()
        with pytest.raises(OSError):
            await server.handle(proto.CommitEnd(1, 1 << 20, digest(b"x" * (1 << 20)), None))

    trio.run(body)
    assert all_temps(root) == []
    assert not (root / "out" / "big.bin").exists()
    assert len(os.listdir("/proc/self/fd")) == fds_before
