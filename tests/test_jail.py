"""jail.py: whatever the agent asks for, nothing outside the root is read or changed."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from topyaz_mount.client.jail import MAX_PATH, Jail, JailError, is_special, split_path

pytestmark = pytest.mark.both_os_calls

# --- split_path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        b"../x",
        b"..",
        b".",
        b"/etc/passwd",
        b"/",
        b"a/../../x",
        b"a/..",
        b"a/./b",
        b"./a",
        b"a//b",
        b"a/",
        b"/a",
        b"a\x00b",
        b"\x00",
        b"x" * 256,
        b"a/" + b"x" * 256,
        b"a/" * (MAX_PATH // 2) + b"a",
    ],
)
def test_split_path_refuses(rel):
    with pytest.raises(JailError):
        split_path(rel)


def test_split_path_refuses_non_bytes():
    with pytest.raises(JailError):
        split_path("a/b")  # type: ignore[arg-type]
    with pytest.raises(JailError):
        split_path(bytearray(b"a"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rel", "parts"),
    [
        (b"", []),
        (b"a", [b"a"]),
        (b"a/b/c.jpg", [b"a", b"b", b"c.jpg"]),
        (b"...", [b"..."]),
        (b"..a/.b", [b"..a", b".b"]),
        (b"\xff\xfe/\\", [b"\xff\xfe", b"\\"]),
        (b"x" * 255, [b"x" * 255]),
    ],
)
def test_split_path_accepts(rel, parts):
    assert split_path(rel) == parts


def test_split_path_errnos():
    with pytest.raises(JailError) as e:
        split_path(b"../x")
    assert e.value.errno == errno.EPERM
    with pytest.raises(JailError) as e:
        split_path(b"a\x00")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(JailError) as e:
        split_path(b"x" * 256)
    assert e.value.errno == errno.ENAMETOOLONG
    assert isinstance(e.value, OSError)


PATH_BYTES = st.lists(
    st.sampled_from([b"a", b"b", b"..", b".", b"", b"/", b"\x00", b"\xff", b"x" * 200]),
    max_size=8,
).map(b"".join)


@settings(database=None, deadline=None, max_examples=500)
@given(st.binary(max_size=64) | PATH_BYTES)
def test_split_path_either_refuses_or_gives_valid_names(rel):
    try:
        parts = split_path(rel)
    except JailError:
        return
    assert b"/".join(parts) == rel
    for part in parts:
        assert part not in (b"", b".", b"..")
        assert b"/" not in part and b"\x00" not in part
        assert 0 < len(part) <= 255


# --- fixtures ------------------------------------------------------------------------


def snapshot(top: Path, skip: Path | None = None) -> dict:
    """Everything observable about a tree (names, types, modes, sizes, times, content)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        d = Path(dirpath)
        if skip is not None and (d == skip or skip in d.parents):
            dirnames[:] = []
            continue
        st_d = os.lstat(d)
        out[str(d)] = ("dir", st_d.st_mode, st_d.st_mtime_ns, st_d.st_uid)
        for name in [*filenames, *dirnames]:
            p = d / name
            if skip is not None and p == skip:
                continue
            s = os.lstat(p)
            if stat.S_ISLNK(s.st_mode):
                out[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISREG(s.st_mode):
                out[str(p)] = ("file", s.st_mode, s.st_mtime_ns, p.read_bytes())
            elif not stat.S_ISDIR(s.st_mode):
                out[str(p)] = ("special", s.st_mode)
    return out


def make_world(base: Path) -> tuple[Path, Path]:
    """base/root (served) and base/outside (must never change)."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"top secret")
    (outside / "sub").mkdir()
    (outside / "sub" / "deep").write_bytes(b"deep secret")
    os.chmod(outside / "secret", 0o640)
    root = base / "root"
    root.mkdir()
    (root / "a").mkdir()
    (root / "a" / "b").write_bytes(b"inside")
    (root / "file").write_bytes(b"hello")
    os.symlink("../outside", root / "dirlink")  # relative, to outside
    os.symlink(str(outside), root / "abslink")  # absolute, to outside
    os.symlink("../outside/secret", root / "filelink")
    os.symlink("a", root / "innerlink")  # to a directory inside the root
    os.symlink("/etc/passwd", root / "a" / "passwd")
    return root, outside


@pytest.fixture
def world(tmp_path):
    root, outside = make_world(tmp_path)
    jail = Jail(root)
    before = snapshot(tmp_path, skip=root)
    yield jail, root, outside, tmp_path
    jail.close()
    assert snapshot(tmp_path, skip=root) == before, "something outside the root changed"


@contextmanager
def no_hang(seconds: int = 5):
    def boom(signum, frame):
        raise TimeoutError("the jail blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 16, 0)
    finally:
        os.close(fd)


# --- reading -------------------------------------------------------------------------


def test_reads_inside_work(world):
    jail, root, _, _ = world
    assert read_fd(jail.open_read(b"a/b")) == b"inside"
    assert jail.lstat(b"file").st_size == 5
    assert stat.S_ISDIR(jail.lstat(b"").st_mode)
    assert os.path.samestat(jail.lstat(b""), os.stat(root))
    names = {n for n, _ in jail.listdir(b"")}
    assert names == {b"a", b"file", b"dirlink", b"abslink", b"filelink", b"innerlink"}
    assert {n for n, _ in jail.listdir(b"a")} == {b"b", b"passwd"}
    assert jail.readlink(b"a/passwd") == b"/etc/passwd"
    assert jail.statvfs().f_bsize > 0


def test_root_given_through_a_symlink_is_resolved(tmp_path):
    root, _ = make_world(tmp_path)
    os.symlink(root, tmp_path / "via")
    jail = Jail(tmp_path / "via")
    try:
        assert jail.root == root.resolve()
        assert read_fd(jail.open_read(b"file")) == b"hello"
    finally:
        jail.close()


@pytest.mark.parametrize(
    "rel", [b"../outside/secret", b"/etc/passwd", b"a/../../outside/secret", b"a/./b", b"a//b", b""]
)
def test_hostile_reads_refused(world, rel):
    jail, *_ = world
    with pytest.raises((JailError, IsADirectoryError)):
        os.close(jail.open_read(rel))
    if rel:
        with pytest.raises(JailError):
            jail.lstat(rel)


HOSTILE = [b"../x", b"/etc/passwd", b"a/../../x", b"a/./b", b"a//b", b"a\x00b", b"a/", b"./file"]
EVERY_OP = [
    ("lstat", lambda rel: (rel,)),
    ("listdir", lambda rel: (rel,)),
    ("open_read", lambda rel: (rel,)),
    ("readlink", lambda rel: (rel,)),
    ("mkdir", lambda rel: (rel, 0o755)),
    ("rmdir", lambda rel: (rel,)),
    ("unlink", lambda rel: (rel,)),
    ("rename", lambda rel: (b"file", rel)),
    ("rename", lambda rel: (rel, b"new")),
    ("symlink", lambda rel: (rel, b"target")),
    ("chmod", lambda rel: (rel, 0o777)),
    ("utime", lambda rel: (rel, 0, 0)),
]


@pytest.mark.parametrize("rel", HOSTILE)
def test_hostile_paths_refused_everywhere(world, rel):
    jail, root, _, _ = world
    for name, args in EVERY_OP:
        with pytest.raises(JailError):
            getattr(jail, name)(*args(rel))
    assert (root / "file").read_bytes() == b"hello"
    assert not (root / "new").exists()


def test_symlink_to_outside_is_a_link_but_never_followed(world):
    jail, *_ = world
    for rel in (b"filelink", b"dirlink", b"abslink", b"a/passwd"):
        assert stat.S_ISLNK(jail.lstat(rel).st_mode)
        with pytest.raises(JailError) as e:
            jail.open_read(rel)
        assert e.value.errno == errno.ELOOP
    assert jail.readlink(b"filelink") == b"../outside/secret"


@pytest.mark.parametrize("link", [b"dirlink", b"abslink", b"innerlink"])
def test_paths_through_a_symlinked_directory_are_refused(world, link):
    """Even a link to a directory inside the root is not walked through."""
    jail, *_ = world
    target = b"secret" if link != b"innerlink" else b"b"
    with pytest.raises(JailError):
        jail.open_read(link + b"/" + target)
    with pytest.raises(JailError):
        jail.lstat(link + b"/" + target)
    with pytest.raises(JailError):
        jail.listdir(link)
    with pytest.raises(JailError):
        jail.readlink(link + b"/x")


@pytest.mark.parametrize("link", [b"dirlink", b"abslink"])
def test_writes_through_a_symlinked_directory_are_refused(world, link):
    jail, root, outside, _ = world
    cases = [
        lambda: jail.mkdir(link + b"/x", 0o755),
        lambda: jail.unlink(link + b"/secret"),
        lambda: jail.rmdir(link + b"/sub"),
        lambda: jail.rename(b"file", link + b"/file"),
        lambda: jail.rename(link + b"/secret", b"stolen"),
        lambda: jail.rename(b"file", link + b"/secret"),
        lambda: jail.symlink(link + b"/evil", b"/etc"),
        lambda: jail.chmod(link + b"/secret", 0o777),
        lambda: jail.utime(link + b"/secret", 0, 0),
        lambda: jail.mkdir(link + b"/sub/x", 0o755),
    ]
    for op in cases:
        with pytest.raises(JailError):
            op()
    assert not (root / "stolen").exists()
    assert (root / "file").read_bytes() == b"hello"
    # the `world` fixture checks that nothing outside changed


def test_changing_the_link_itself_stays_inside(world):
    """Operations on a symlink's own name act on the link, never on its target."""
    jail, root, outside, _ = world
    jail.chmod(b"filelink", 0o777)  # no-op for links
    jail.utime(b"filelink", 1_000_000_000, 2_000_000_000)
    assert os.lstat(root / "filelink").st_mtime_ns == 2_000_000_000
    jail.rename(b"filelink", b"a/moved")
    assert os.readlink(root / "a" / "moved") == "../outside/secret"
    jail.unlink(b"a/moved")
    jail.unlink(b"dirlink")
    assert not os.path.lexists(root / "dirlink")
    with pytest.raises(FileExistsError):
        jail.mkdir(b"abslink", 0o755)
    with pytest.raises(OSError):
        jail.rmdir(b"abslink")


def test_root_itself_cannot_be_changed(world):
    jail, *_ = world
    for op in (
        lambda: jail.rmdir(b""),
        lambda: jail.unlink(b""),
        lambda: jail.rename(b"", b"x"),
        lambda: jail.rename(b"file", b""),
        lambda: jail.mkdir(b"", 0o755),
        lambda: jail.chmod(b"", 0o777),
    ):
        with pytest.raises(JailError):
            op()


def test_changes_inside_work(world):
    jail, root, _, _ = world
    jail.mkdir(b"new", 0o4750)
    assert stat.S_IMODE(os.stat(root / "new").st_mode) & 0o777 == 0o750 & ~_umask()
    jail.rename(b"file", b"new/file")
    assert (root / "new" / "file").read_bytes() == b"hello"
    with pytest.raises(JailError) as e:
        jail.rename(b"a/b", b"new/file", noreplace=True)
    assert e.value.errno == errno.EEXIST
    jail.chmod(b"new/file", 0o600)
    assert stat.S_IMODE(os.stat(root / "new" / "file").st_mode) == 0o600
    jail.utime(b"new/file", None, 123_000_000_000)
    assert os.stat(root / "new" / "file").st_mtime_ns == 123_000_000_000
    with pytest.raises(JailError) as e:
        jail.unlink(b"new")
    assert e.value.errno == errno.EISDIR
    jail.unlink(b"new/file")
    jail.rmdir(b"new")
    jail.symlink(b"lnk", b"/etc")
    assert os.readlink(root / "lnk") == "/etc"
    with pytest.raises(JailError):
        jail.listdir(b"lnk")


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# --- special files -------------------------------------------------------------------


def test_fifo_is_not_listed_not_opened_and_does_not_hang(world):
    jail, root, _, _ = world
    os.mkfifo(root / "fifo")
    with no_hang():
        assert b"fifo" not in {n for n, _ in jail.listdir(b"")}
        with pytest.raises(JailError) as e:
            jail.lstat(b"fifo")
        assert e.value.errno == errno.EACCES
        with pytest.raises(JailError):
            jail.open_read(b"fifo")


def test_socket_is_not_listed_or_opened(world):
    jail, root, _, _ = world
    # AF_UNIX paths are limited to ~108 bytes: bind from inside the directory
    cwd = os.getcwd()
    s = socket.socket(socket.AF_UNIX)
    try:
        os.chdir(root)
        s.bind("sock")
    finally:
        os.chdir(cwd)
    try:
        with no_hang():
            assert b"sock" not in {n for n, _ in jail.listdir(b"")}
            with pytest.raises(JailError):
                jail.lstat(b"sock")
            with pytest.raises(OSError):
                jail.open_read(b"sock")
    finally:
        s.close()


def test_is_special():
    assert not is_special(stat.S_IFREG | 0o644)
    assert not is_special(stat.S_IFDIR | 0o755)
    assert not is_special(stat.S_IFLNK | 0o777)
    for kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        assert is_special(kind | 0o644)


def test_directory_is_not_opened_for_reading(world):
    jail, *_ = world
    with pytest.raises(JailError):
        jail.open_read(b"a")


def test_closed_jail_closes_its_fd(tmp_path):
    jail = Jail(tmp_path)
    jail.close()
    jail.close()  # idempotent


# --- the property: no sequence of operations touches anything outside ------------------

NAMES = [b"a", b"b", b"x", b"dirlink", b"abslink", b"filelink", b"innerlink", b"..", b".", b""]
VALID = st.sampled_from(
    [b"a", b"a/b", b"file", b"x", b"x/y", b"a/x", b"dirlink", b"filelink", b"innerlink", b"abslink"]
)
REL = st.one_of(
    VALID,
    VALID,
    st.lists(st.sampled_from(NAMES), min_size=0, max_size=3).map(b"/".join),
    st.sampled_from(
        [
            b"/etc/passwd",
            b"../outside/secret",
            b"a/../../outside",
            b"dirlink/secret",
            b"abslink/sub",
        ]
    ),
    st.binary(max_size=12),
)
TARGETS = st.sampled_from([b"/etc", b"../outside", b"../outside/secret", b"a", b"dirlink/sub"])

OPS = st.one_of(
    st.tuples(st.just("lstat"), REL),
    st.tuples(st.just("listdir"), REL),
    st.tuples(st.just("open_read"), REL),
    st.tuples(st.just("readlink"), REL),
    st.tuples(st.just("mkdir"), REL, st.sampled_from([0o755, 0o7777, 0o000])),
    st.tuples(st.just("rmdir"), REL),
    st.tuples(st.just("unlink"), REL),
    st.tuples(st.just("rename"), REL, REL, st.booleans()),
    st.tuples(st.just("symlink"), REL, TARGETS),
    st.tuples(st.just("chmod"), REL, st.sampled_from([0o777, 0o000, 0o4755])),
    st.tuples(st.just("utime"), REL, st.sampled_from([None, 0]), st.sampled_from([None, 0])),
)


@settings(database=None, deadline=None, max_examples=120)
@given(st.lists(OPS, min_size=1, max_size=12))
def test_no_operation_touches_anything_outside_the_root(ops):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root, outside = make_world(base)
        before = snapshot(base, skip=root)
        jail = Jail(root)
        try:
            with no_hang():
                for name, *args in ops:
                    try:
                        result = getattr(jail, name)(*args)
                    except (OSError, ValueError):  # ValueError: NUL in a symlink target
                        continue
                    event(f"{name} succeeded")
                    if name == "open_read":
                        os.close(result)
                    assert snapshot(base, skip=root) == before, (name, args)
        finally:
            jail.close()
        assert snapshot(base, skip=root) == before
        # and nothing readable from the outside tree ever came back
        for dirpath, _, filenames in os.walk(root):
            for f in filenames:
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink():
                    assert b"secret" not in p.read_bytes()
