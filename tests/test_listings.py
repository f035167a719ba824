"""listings.py: which lookups a recent directory listing may answer."""

from __future__ import annotations

from topyaz_mount import proto
from topyaz_mount.agent.listings import MISSING, RELIST_MAX, STALE, UNKNOWN, Listings

A = proto.Attr(0o100644, 3, 1, 1, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_fresh_listing_answers_both_ways():
    lst = Listings(5, Clock())
    lst.listed(b"in", {b"a.jpg": A})
    assert lst.answer(b"in/a.jpg") == A
    assert lst.answer(b"in/b.jpg") is MISSING
    assert lst.answer(b"other/a.jpg") is UNKNOWN  # never listed
    assert lst.answer(b"in/sub/a.jpg") is UNKNOWN  # in/sub never listed


def test_the_root_directory_lists_like_any_other():
    lst = Listings(5, Clock())
    lst.listed(b"", {b"top": A})
    assert lst.answer(b"top") == A
    assert lst.answer(b"nope") is MISSING


def test_an_old_listing_is_read_again_or_not_used():
    clock = Clock()
    lst = Listings(5, clock)
    lst.listed(b"small", {b"a": A})
    lst.listed(b"big", {str(i).encode(): A for i in range(RELIST_MAX + 1)})
    clock.now += 5.5
    assert lst.answer(b"small/zzz") is STALE
    assert lst.answer(b"big/zzz") is UNKNOWN  # a Stat is cheaper than relisting it


def test_names_we_change_are_asked_about_never_denied():
    lst = Listings(5, Clock())
    lst.listed(b"out", {b"old": A})
    lst.touched(b"out/new.jpg")  # the job creates it: the listing cannot say it is absent
    lst.touched(b"out/old")  # the job unlinks or rewrites it: the listed attr is stale
    assert lst.answer(b"out/new.jpg") is UNKNOWN
    assert lst.answer(b"out/old") is UNKNOWN
    assert lst.answer(b"out/other") is MISSING


def test_dropping_a_path_forgets_it_its_directory_and_below():
    lst = Listings(5, Clock())
    for d in (b"", b"a", b"a/b", b"a/b/c", b"ab"):
        lst.listed(d, {})
    lst.drop(b"a/b")
    assert lst.answer(b"a/x") is UNKNOWN  # the directory holding a/b
    assert lst.answer(b"a/b/x") is UNKNOWN
    assert lst.answer(b"a/b/c/x") is UNKNOWN
    assert lst.answer(b"ab/x") is MISSING  # a sibling sharing the prefix is kept
    assert lst.answer(b"x") is MISSING
