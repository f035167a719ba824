"""What Mac volumes do to names: case-insensitive lookups (two spellings, one file),
NFD names from the Finder, and ``._*`` AppleDouble files; in the translation, the
announced inputs, the hash index and the jail.

This machine's file systems are case-sensitive and byte-exact (no vfat, exfat or ext4
casefold here), so a Mac volume's lookups are simulated: ``mac_lstat`` answers for a
path as APFS would, finding each name by folding case and Unicode form against the real
directory's listing. The stored names, listings and files are real.
"""

from __future__ import annotations

import errno
import os
import unicodedata
from pathlib import Path

import blake3
import pytest
import trio

from topyaz_mount.client import jail
from topyaz_mount.client.fileserver import FileServer
from topyaz_mount.client.hashindex import HashIndex
from topyaz_mount.client.inputs import input_files
from topyaz_mount.client.spelling import Spelling, fold
from topyaz_mount.client.translate import (
    PathMap,
    TranslationError,
    translate_argv,
    translate_cwd,
    translate_value,
)
from topyaz_mount.wire import proto

NFD_NAME = unicodedata.normalize("NFD", "café.jpg")  # as the Finder stores it
NFC_NAME = unicodedata.normalize("NFC", "café.jpg")  # as a keyboard types it
REMOTE = "/mnt/session/root"


def mac_lstat(path: str) -> os.stat_result:
    """os.lstat as a case- and normalization-insensitive volume answers it."""
    real = "/"
    for name in [p for p in path.split("/") if p]:
        try:
            entries = os.listdir(real)
        except OSError:
            raise FileNotFoundError(errno.ENOENT, "no such file", path) from None
        match = [e for e in entries if fold(e) == fold(name)]
        if not match:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        real = os.path.join(real, match[0])
    return os.lstat(real)


def mac_lexists(path: str) -> bool:
    try:
        mac_lstat(path)
    except OSError:
        return False
    return True


def mac_spelling() -> Spelling:
    return Spelling(lstat=mac_lstat)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def work(tmp_path) -> Path:
    """A root as a Mac user keeps it: stored names in mixed case and NFD."""
    root = tmp_path / "Work"
    (root / "shots").mkdir(parents=True)
    (root / "out").mkdir()
    (root / "shots" / "a.jpg").write_bytes(b"image a")
    (root / "shots" / "._a.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "shots" / NFD_NAME).write_bytes(b"image cafe")
    return root


def translate(argv, root: Path, cwd: Path | str):
    pm = PathMap(str(root), REMOTE)
    return translate_argv(argv, pm, str(cwd), lexists=mac_lexists, spell=mac_spelling())


# --- translation --------------------------------------------------------------------------


def test_a_relative_path_in_another_case_reaches_the_job_as_stored(work):
    assert translate(["tpai", "Shots/A.JPG", "-o", "OUT/"], work, work) == [
        "tpai",
        "shots/a.jpg",
        "-o",
        "out/",
    ]


def test_an_absolute_path_in_another_case_is_under_the_root(work):
    typed = str(work.parent / "WORK" / "SHOTS" / "a.JPG")
    assert translate([typed], work, work) == [f"{REMOTE}/shots/a.jpg"]


def test_an_nfc_name_typed_for_an_nfd_file_reaches_the_job_as_stored(work):
    (out,) = translate([f"shots/{NFC_NAME}"], work, work)
    assert out == f"shots/{NFD_NAME}" and out.encode() != f"shots/{NFC_NAME}".encode()


def test_a_new_output_keeps_its_typed_name_below_the_stored_directory(work):
    typed = str(work / "OUT" / "New.TIF")
    assert translate([typed, "Out/Other.tif"], work, work) == [
        f"{REMOTE}/out/New.TIF",
        "out/Other.tif",
    ]


def test_the_working_directory_in_another_case(work):
    pm = PathMap(str(work), REMOTE)
    cwd = str(work.parent / "work" / "SHOTS")
    assert translate_cwd(cwd, pm, spell=mac_spelling()) == f"{REMOTE}/shots"
    assert translate(["A.JPG"], work, cwd) == ["a.jpg"]


def test_outside_the_root_is_still_refused_in_any_case(work):
    (work.parent / "elsewhere.jpg").write_bytes(b"x")
    pm = PathMap(str(work), REMOTE)
    with pytest.raises(TranslationError):
        translate_value(
            str(work.parent / "ELSEWHERE.JPG"),
            pm,
            str(work),
            lexists=mac_lexists,
            spell=mac_spelling(),
        )


def test_a_case_sensitive_volume_keeps_two_files_apart(tmp_path):
    (tmp_path / "A.jpg").write_bytes(b"upper")
    (tmp_path / "a.jpg").write_bytes(b"lower")
    spell = Spelling()  # the real (case-sensitive) file system
    assert spell(str(tmp_path / "A.jpg")) == str(tmp_path / "A.jpg")
    assert spell(str(tmp_path / "a.jpg")) == str(tmp_path / "a.jpg")
    assert spell(str(tmp_path / "A.JPG")) == str(tmp_path / "A.JPG")  # no such file


def test_folding_alone_never_picks_a_different_file(tmp_path):
    """A volume where ``A.JPG`` resolves to a file other than the listed ``a.jpg`` (two
    files that fold alike): the name stays as typed rather than naming the wrong one."""
    (tmp_path / "a.jpg").write_bytes(b"one")
    (tmp_path / "x").write_bytes(b"other")

    def lstat(path: str) -> os.stat_result:
        return os.lstat(tmp_path / "x") if path.endswith("A.JPG") else os.lstat(path)

    assert Spelling(lstat=lstat)(str(tmp_path / "A.JPG")) == str(tmp_path / "A.JPG")


def test_the_root_is_kept_as_stored(work, monkeypatch):
    monkeypatch.setattr(jail, "Spelling", mac_spelling)
    assert jail.checked_root(str(work.parent / "WORK")) == work


# --- the announced inputs -----------------------------------------------------------------


def test_inputs_are_announced_as_the_job_opens_them(work):
    pm = PathMap(str(work), "/")
    argv = ["tpai", "Shots/A.JPG", f"SHOTS/{NFC_NAME}", "-o", "out/"]
    assert input_files(argv, pm, str(work), spell=mac_spelling()) == [
        b"shots/a.jpg",
        f"shots/{NFD_NAME}".encode(),
    ]
    translated = translate(argv, work, work)
    assert translated[1:3] == ["shots/a.jpg", f"shots/{NFD_NAME}"]


def test_appledouble_files_are_never_announced(work):
    pm = PathMap(str(work), "/")
    paths = input_files(["tpai", "Shots/"], pm, str(work), spell=mac_spelling())
    assert b"shots/._a.jpg" in paths  # the forecast walks the folder...
    server = FileServer(work)
    try:
        announced = [e.path for e in server.manifest(paths, 1 << 20)]
    finally:
        server.close()
    # ...but the manifest (what the agent is told) never holds the AppleDouble file
    assert sorted(announced) == sorted([b"shots/a.jpg", f"shots/{NFD_NAME}".encode()])


# --- the hash index -----------------------------------------------------------------------


def test_two_spellings_of_one_file_are_one_index_entry(tmp_path):
    """The index is keyed by (device, inode): however a name is spelled, the file it
    opens has one entry. (A hard link is the second name on this case-sensitive disk.)"""
    (tmp_path / "a.jpg").write_bytes(b"image a")
    os.link(tmp_path / "a.jpg", tmp_path / "A.JPG")
    (tmp_path / "._a.jpg").write_bytes(b"image a")  # same bytes, its own file
    index = HashIndex(tmp_path / "hashes.sqlite")
    try:
        fd = os.open(tmp_path / "a.jpg", os.O_RDONLY)
        try:
            digest = index.hash_of(fd)
        finally:
            os.close(fd)
        assert digest == blake3.blake3(b"image a").digest()
        assert index.lookup(os.stat(tmp_path / "A.JPG")) == digest
        assert index.lookup(os.stat(tmp_path / "._a.jpg")) is None
        assert index.hashed_files == 1
    finally:
        index.close()


# --- the jail -----------------------------------------------------------------------------


def call(server: FileServer, req):
    return trio.run(server.handle, req)


def test_appledouble_files_do_not_exist_for_the_agent(work):
    server = FileServer(work)
    try:
        names = {e.name for e in call(server, proto.ListDir(b"shots")).entries}
        assert names == {b"a.jpg", NFD_NAME.encode()}
        for req in (proto.Stat(b"shots/._a.jpg"), proto.OpenRead(b"shots/._a.jpg")):
            with pytest.raises(OSError) as e:
                call(server, req)
            assert e.value.errno == errno.ENOENT
        for req in (
            proto.CommitBegin(1, b"out/._b.jpg", 0o644),
            proto.Rename(b"shots/a.jpg", b"shots/._a.jpg"),
            proto.Unlink(b"shots/._a.jpg"),
        ):
            with pytest.raises(OSError) as e:
                call(server, req)
            assert e.value.errno == errno.EACCES
        assert [(r.path, r.op, r.why) for r in server.refusals.since(0)] == [
            (b"out/._b.jpg", "write", "hidden: ._*"),
            (b"shots/._a.jpg", "rename", "hidden: ._*"),
            (b"shots/._a.jpg", "delete", "hidden: ._*"),
        ]
    finally:
        server.close()
    assert (work / "shots" / "._a.jpg").read_bytes() == b"\0\5\26\7 AppleDouble"
    assert (work / "shots" / "a.jpg").read_bytes() == b"image a"
    assert os.listdir(work / "out") == []


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_job_never_sees_appledouble_files(testhost, client_root):
    """Through a real mount: a folder copied from a Mac volume, its ``._*`` files
    beside the images; the job lists, reads and copies the folder without them."""
    from e2e_util import describe, run_exec

    shots = client_root / "macshots"
    shots.mkdir()
    (shots / "a.jpg").write_bytes(b"image a")
    (shots / "._a.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    script = (
        "ls -a macshots; cat macshots/._a.jpg 2>/dev/null || echo unreadable; "
        "cp -r macshots copy && ls -a copy; echo x > copy/._b.jpg 2>/dev/null || echo refused"
    )
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    assert r.stdout.decode().split() == [
        ".",
        "..",
        "a.jpg",
        "unreadable",
        ".",
        "..",
        "a.jpg",
        "refused",
    ]
    assert (shots / "._a.jpg").read_bytes() == b"\0\5\26\7 AppleDouble"
    assert sorted(os.listdir(client_root / "copy")) == ["a.jpg"]
    assert (client_root / "copy" / "a.jpg").read_bytes() == b"image a"
