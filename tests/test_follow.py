"""follow.py: which orders the job is seen to follow, and what is prefetched then."""

from __future__ import annotations

import stat

from topyaz_mount.agent.follow import Follower, natural_key
from topyaz_mount.wire import proto

KIB = 1 << 10


def f(size: int = 256 * KIB) -> proto.Attr:
    return proto.Attr(stat.S_IFREG | 0o644, size, 1, 1, 1)


DIR = proto.Attr(stat.S_IFDIR | 0o755, 0, 1, 1, 1)


def names(ahead) -> list[bytes]:
    return [p for p, _ in ahead.files]


def listing(*entries: str, size: int = 256 * KIB):
    return [(n.rstrip("/").encode(), DIR if n.endswith("/") else f(size)) for n in entries]


def test_a_glob_over_a_directory_the_job_listed_is_followed_from_its_first_file():
    fw = Follower()
    fw.listed(b"small", listing("b.bin", "a.bin", "c.bin", "notes.txt"), by_job=True)
    ahead = fw.opened(b"small/a.bin")
    assert names(ahead) == [b"small/b.bin", b"small/c.bin"]  # name order, .bin only
    assert names(fw.opened(b"small/b.bin")) == []  # already on its way
    assert names(fw.opened(b"small/c.bin")) == []


def test_until_the_job_steps_to_a_next_file_only_a_little_is_guessed():
    fw = Follower()
    fw.listed(b"d", listing(*(f"{i}.bin" for i in range(9))), by_job=True)
    assert names(fw.opened(b"d/0.bin")) == [b"d/1.bin", b"d/2.bin", b"d/3.bin", b"d/4.bin"]
    assert len(names(fw.opened(b"d/1.bin"))) == 4  # a step: the whole budget (the rest)
    fw.listed(b"big", listing("a.bin", "b.bin", "c.bin", size=100 << 20), by_job=True)
    assert names(fw.opened(b"big/a.bin")) == []  # too big to guess
    assert names(fw.opened(b"big/b.bin")) == [b"big/c.bin"]


def test_a_directory_listed_by_a_lookup_needs_two_opens_in_order():
    fw = Follower()
    fw.listed(b"d", listing(*(f"x{i}.png" for i in range(5))), by_job=False)
    assert names(fw.opened(b"d/x0.png")) == []
    assert names(fw.opened(b"d/x1.png")) == [b"d/x2.png", b"d/x3.png", b"d/x4.png"]


def test_numeric_order_is_followed_where_it_differs_from_name_order():
    fw = Follower()
    fw.listed(b"seq", listing(*(f"{i}.png" for i in range(1, 13))), by_job=False)
    fw.opened(b"seq/1.png")
    ahead = fw.opened(b"seq/2.png")  # name order would have 10.png, 11.png, 12.png next
    assert names(ahead) == [f"seq/{i}.png".encode() for i in range(3, 13)]
    assert sorted([b"f10", b"f2", b"f1"], key=natural_key) == [b"f1", b"f2", b"f10"]


def test_the_prefetch_stops_when_the_job_leaves_the_order_and_resumes_with_it():
    fw = Follower(budget=2 * 256 * KIB)
    fw.listed(b"d", listing(*(f"{i:03d}.bin" for i in range(10))), by_job=True)
    assert names(fw.opened(b"d/000.bin")) == [b"d/001.bin", b"d/002.bin"]  # the budget
    assert names(fw.opened(b"d/001.bin")) == [b"d/003.bin"]  # one more as the job moves
    assert names(fw.opened(b"d/007.bin")) == []  # out of order: stop
    assert names(fw.opened(b"d/003.bin")) == []  # still not in order
    assert names(fw.opened(b"d/004.bin")) == [b"d/005.bin", b"d/006.bin"]  # back in order


def test_opens_before_any_listing_ask_for_one_and_are_judged_when_it_comes():
    fw = Follower()
    assert fw.opened(b"frames/00001.png").list_dir is None
    assert fw.opened(b"frames/00002.png").list_dir == b"frames"
    assert fw.opened(b"frames/00003.png").list_dir is None  # asked once

    ahead = fw.listed(b"frames", listing(*(f"{i:05d}.png" for i in range(1, 7))), by_job=False)
    assert names(ahead) == [b"frames/00004.png", b"frames/00005.png", b"frames/00006.png"]


def test_files_the_manifest_named_are_left_to_it():
    fw = Follower()
    fw.named = {b"d/b.bin"}
    fw.listed(b"d", listing("a.bin", "b.bin", "c.bin"), by_job=True)
    assert names(fw.opened(b"d/a.bin")) == [b"d/c.bin"]


def test_a_walk_is_followed_one_directory_ahead():
    fw = Follower()
    fw.listed(b"", listing("a/", "b/", "c/"), by_job=True)
    fw.listed(b"a", listing("1.jpg", "2.jpg"), by_job=True)
    # a's last file is on its way: list the next directory ahead (once)
    assert [fw.opened(b"a/1.jpg").list_dir, fw.opened(b"a/2.jpg").list_dir] == [b"b", None]
    ahead = fw.listed(b"b", listing("1.jpg", "2.jpg", "x.txt"), by_job=False)
    assert names(ahead) == [b"b/1.jpg", b"b/2.jpg"]  # its files of the suffix followed
    assert fw.opened(b"b/1.jpg").list_dir == b"c"  # b is all on its way: c next
    assert names(fw.opened(b"b/2.jpg")) == []


def test_a_changed_directory_is_forgotten():
    fw = Follower()
    fw.listed(b"d", listing("a.bin", "b.bin"), by_job=True)
    fw.forget(b"d")
    assert names(fw.opened(b"d/a.bin")) == []


def test_one_file_opened_again_and_again_lists_nothing():
    """Concurrent readers of one input: no order to learn, and a listing of the
    directory would only carry its other small files over for nothing."""
    fw = Follower()
    assert [fw.opened(b"photo.png").list_dir for _ in range(4)] == [None] * 4
    assert fw.opened(b"other.png").list_dir == b""  # a second file: list it, then judge
