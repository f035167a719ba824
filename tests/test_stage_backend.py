"""The stage backend's pieces that need no host: copies that are never links, the
open-writer check, which argument names a path in the tree, and store objects lent
to the tree and taken back."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from topyaz_mount.agent.filecopy import clone_or_copy
from topyaz_mount.agent.stage_backend import StageBackend, open_for_writing_elsewhere


def _copy(src: Path, dst: Path, size: int | None = None) -> None:
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        clone_or_copy(s, d, src.stat().st_size if size is None else size)
    finally:
        os.close(s)
        os.close(d)


def test_a_copy_is_never_a_link_and_writes_into_it_leave_the_source_alone(tmp_path):
    data = os.urandom((3 << 20) + 17)
    src, dst = tmp_path / "object", tmp_path / "staged"
    src.write_bytes(data)
    _copy(src, dst)
    assert dst.read_bytes() == data
    assert src.stat().st_ino != dst.stat().st_ino and src.stat().st_nlink == 1
    with open(dst, "ab") as f:  # a job appending to its input
        f.write(b"more")
    with open(dst, "r+b") as f:  # and rewriting its first bytes in place
        f.write(b"XXXX")
    assert src.read_bytes() == data
    assert dst.read_bytes() == b"XXXX" + data[4:] + b"more"


def test_a_source_shorter_than_promised_is_an_error(tmp_path):
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(OSError) as e:
        _copy(tmp_path / "short", tmp_path / "copy", size=10)
    assert e.value.errno == errno.EIO


def test_an_open_writer_is_seen_and_a_closed_file_is_not(tmp_path):
    path = tmp_path / "out.png"
    with open(path, "wb") as f:
        f.write(b"half")
        assert open_for_writing_elsewhere(path) is True
    assert open_for_writing_elsewhere(path) is False
    with open(path, "rb"):  # readers do not hold an output back
        assert open_for_writing_elsewhere(path) is False


def test_paths_in_the_tree_from_arguments(tmp_path):
    tree = tmp_path / "sessions" / "abc" / "root"
    backend = StageBackend(SimpleNamespace(mountpoint=tree, session_dir=tree.parent))
    cwd = str(tree / "shots")
    assert backend._relative("a.jpg", cwd) == b"shots/a.jpg"
    assert backend._relative("../out/x y.png", cwd) == b"out/x y.png"
    assert backend._relative(str(tree), cwd) == b""
    assert backend._relative("/etc/passwd", cwd) is None
    assert backend._relative("../../root2/x", cwd) is None


BLOCK_PYFUSE3 = r"""
import sys

class NoPyfuse3:
    def find_spec(self, name, path=None, target=None):
        if name == "pyfuse3" or name.startswith("pyfuse3."):
            raise ImportError("pyfuse3 blocked for this test")

sys.meta_path.insert(0, NoPyfuse3())
import topyaz_mount.agent.__main__
import topyaz_mount.agent.session
import topyaz_mount.agent.stage_backend
from topyaz_mount.agent.backend import fuse_unusable_reason
print(fuse_unusable_reason())
assert "pyfuse3" not in sys.modules
"""


def test_the_stage_path_runs_without_pyfuse3():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", BLOCK_PYFUSE3], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pyfuse3 is not installed"


def _store_with(tmp_path: Path, data: bytes):
    """A content store holding ``data`` as an object; and its digest."""
    from topyaz_mount.agent.store import ContentStore

    store = ContentStore(tmp_path / "store", cap=1 << 30)
    fd, temp = store.new_temp(len(data))
    os.pwrite(fd, data, 0)
    digest = store.add(temp, fd, None)
    os.close(fd)
    return store, digest


def test_the_store_lends_an_object_nobody_reads_and_takes_it_back(tmp_path):
    data = os.urandom(100_000)
    store, digest = _store_with(tmp_path, data)
    staged = tmp_path / "tree-file"
    assert store.lend(digest, len(data), staged)
    assert staged.read_bytes() == data and not store.has(digest, len(data))
    assert store.open(digest, len(data)) is None  # lent: a session fetches it again
    assert store.take(staged, digest, len(data))
    fd = store.open(digest, len(data))
    assert fd is not None
    assert os.pread(fd, len(data) + 1, 0) == data
    os.close(fd)


def test_an_object_another_session_reads_is_not_lent(tmp_path):
    data = os.urandom(100_000)
    store, digest = _store_with(tmp_path, data)
    reader = store.open(digest, len(data))  # holds a shared lock, as a session's open
    assert reader is not None
    try:
        assert not store.lend(digest, len(data), tmp_path / "tree-file")
        assert store.has(digest, len(data)) and not (tmp_path / "tree-file").exists()
    finally:
        os.close(reader)


def test_a_taken_back_file_that_changed_unseen_is_not_served(tmp_path):
    """take() trusts the caller's check; the first open in a session hashes it."""
    from topyaz_mount.agent.store import ContentStore

    data = os.urandom(100_000)
    store, digest = _store_with(tmp_path, data)
    staged = tmp_path / "tree-file"
    assert store.lend(digest, len(data), staged)
    with open(staged, "r+b") as f:  # a job writes into its input, size unchanged
        f.write(b"XXXX")
    assert store.take(staged, digest, len(data))
    fresh = ContentStore(tmp_path / "store", cap=1 << 30)  # the next session's store
    assert fresh.open(digest, len(data)) is None
    assert not fresh.has(digest, len(data))  # removed as damaged


def test_the_reflink_probe_leaves_nothing_behind(tmp_path):
    from topyaz_mount.agent.filecopy import reflinks_work

    assert reflinks_work(tmp_path) in (True, False)  # ext4 here: False, inputs are lent
    assert list(tmp_path.iterdir()) == []
    assert reflinks_work(tmp_path / "missing") is False
