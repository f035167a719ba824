"""inputs.py: the inputs a command's arguments announce, from patterns and lists too."""

from __future__ import annotations

import os
from pathlib import Path

from topyaz_mount.client.inputs import MAX_LIST_BYTES, input_files
from topyaz_mount.client.translate import PathMap


def forecast(root: Path, *argv: str, cwd: Path | None = None) -> list[bytes]:
    return input_files(argv, PathMap(str(root), "/"), str(cwd or root))


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_a_sequence_pattern_announces_its_files_in_numeric_order(tmp_path):
    touch(tmp_path, "frames/00002.png", "frames/00001.png", "frames/00010.png", "frames/a.png")
    touch(tmp_path, "n/1.tif", "n/10.tif", "n/2.tif", "n/x1.tif")
    got = forecast(tmp_path, "ffmpeg", "-i", "frames/%05d.png", "out.mp4")
    assert got == [b"frames/00001.png", b"frames/00002.png", b"frames/00010.png"]
    assert forecast(tmp_path, "ffmpeg", "-i", "n/%d.tif") == [b"n/1.tif", b"n/2.tif", b"n/10.tif"]
    assert forecast(tmp_path, "printf", "%d%d") == []  # two numbers: no sequence


def test_a_glob_the_shell_left_announces_its_matches_in_name_order(tmp_path):
    touch(tmp_path, "small/b.bin", "small/a.bin", "small/c.txt", "small/.hidden.bin")
    touch(tmp_path, "sub/x/1.bin", "sub/y/2.bin")
    assert forecast(tmp_path, "tool", "small/*.bin") == [b"small/a.bin", b"small/b.bin"]
    assert forecast(tmp_path, "tool", "sub/*/?.bin") == [b"sub/x/1.bin", b"sub/y/2.bin"]
    # a command string for a remote shell names no file: the agent follows that one
    assert forecast(tmp_path, "sh", "-c", "cat small/*.bin") == []


def test_patterns_never_reach_outside_the_root(tmp_path):
    root = tmp_path / "root"
    touch(tmp_path, "outside/1.bin", "outside/00001.png", "root/in.bin")
    assert forecast(root, "tool", "../outside/*.bin") == []
    assert forecast(root, "tool", f"{tmp_path}/outside/%05d.png") == []
    assert forecast(root, "tool", f"{tmp_path}/*/in.bin") == []  # matched from outside


def test_a_file_list_announces_the_list_then_its_files(tmp_path):
    touch(tmp_path, "in/a.jpg", "in/b.jpg")
    (tmp_path / "list.txt").write_text("in/b.jpg\n\nin/a.jpg\n")
    expect = [b"list.txt", b"in/b.jpg", b"in/a.jpg"]
    assert forecast(tmp_path, "tool", "@list.txt") == expect
    assert forecast(tmp_path, "tool", "-i", "list.txt") == expect
    # relative to the list's own directory when not to the working directory
    (tmp_path / "in" / "rel.txt").write_text("a.jpg\nb.jpg\n")
    got = forecast(tmp_path, "tool", "in/rel.txt")
    assert got == [b"in/rel.txt", b"in/a.jpg", b"in/b.jpg"]


def test_a_text_file_that_is_not_all_paths_is_just_a_file(tmp_path):
    touch(tmp_path, "in/a.jpg")
    (tmp_path / "notes.txt").write_text("in/a.jpg\nsomething else\n")
    assert forecast(tmp_path, "tool", "notes.txt") == [b"notes.txt"]
    (tmp_path / "out.txt").write_text(f"{tmp_path.parent}/elsewhere\n")
    assert forecast(tmp_path, "tool", "out.txt") == [b"out.txt"]
    (tmp_path / "bin.dat").write_bytes(b"in/a.jpg\0\n")
    assert forecast(tmp_path, "tool", "bin.dat") == [b"bin.dat"]
    big = tmp_path / "big.txt"
    big.write_text("in/a.jpg\n" * (MAX_LIST_BYTES // 9 + 1))
    assert forecast(tmp_path, "tool", "big.txt") == [b"big.txt"]  # too big to be a list


def test_a_list_naming_files_outside_the_root_adds_none(tmp_path):
    root = tmp_path / "root"
    touch(tmp_path, "secret.bin", "root/ok.bin")
    (root / "l.txt").write_text(f"ok.bin\n{os.path.join(tmp_path, 'secret.bin')}\n")
    assert forecast(root, "tool", "@l.txt") == [b"l.txt"]
