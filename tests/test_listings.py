"""listings.py: which lookups a recent directory listing may answer."""

from __future__ import annotations

from topyaz_mount.agent.listings import MISSING, RELIST_MAX, STALE, UNKNOWN, Listings
from topyaz_mount.wire import proto

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


def test_a_listing_read_after_we_changed_a_name_does_not_deny_it():
    # The job created out/a (its commit still on the way) before the directory was
    # listed: the new listing lacks "a", but "a" is ours, so the client is asked.
    lst = Listings(5, Clock())
    lst.touched(b"out/a")
    lst.listed(b"out", {})
    assert lst.answer(b"out/a") is UNKNOWN
    assert lst.answer(b"out/b") is MISSING
    lst.listed(b"out", {b"a": A})  # read again later: still asked, never denied
    assert lst.answer(b"out/a") is UNKNOWN


def test_a_renamed_directory_keeps_what_we_changed_below_it():
    lst = Listings(5, Clock())
    lst.touched(b"tmp/sub/a")
    lst.moved(b"tmp", b"final")
    lst.listed(b"final/sub", {})
    assert lst.answer(b"final/sub/a") is UNKNOWN
    assert lst.answer(b"final/sub/b") is MISSING


def test_a_listing_ages_from_when_it_was_asked_for():
    clock = Clock()
    lst = Listings(5, clock)
    asked = clock.now
    clock.now += 4  # a slow reply
    lst.listed(b"d", {}, asked)
    clock.now += 1.5
    assert lst.answer(b"d/x") is STALE


def test_has_tells_a_directory_listed_from_one_never_listed():
    lst = Listings(5, Clock())
    assert not lst.has(b"in")
    lst.listed(b"in", {})
    assert lst.has(b"in") and not lst.has(b"other")
    lst.drop(b"in")
    assert not lst.has(b"in")
