"""How far an output is complete from its start, when write-back delivers pages out of order.

An upload that follows the writer sends only up to this front: a page that arrives before
the one behind it must not be read as a hole and sent (the upload would then start over).
"""

from __future__ import annotations

from topyaz_mount.agent.spool import MAX_GAPS, WrittenFront


def test_in_order_writes_move_the_front():
    front = WrittenFront()
    for i in range(4):
        assert front.add(i * 100, 100)
    assert front.end == 400
    assert front.ahead == {}


def test_a_later_page_first_waits_for_the_gap():
    front = WrittenFront()
    assert front.add(0, 100)
    assert front.add(200, 100)  # arrived before [100, 200)
    assert front.end == 100
    assert front.add(300, 50)
    assert front.end == 100
    assert front.add(100, 100)  # the gap filled: the front reaches all that follows
    assert front.end == 350
    assert front.ahead == {}


def test_overlapping_and_repeated_writes():
    front = WrittenFront()
    assert front.add(50, 100)
    assert front.add(50, 20)  # the same start, shorter: the longer write counts
    assert front.end == 0
    assert front.add(0, 60)
    assert front.end == 150
    assert front.add(10, 10)  # behind the front: nothing changes
    assert front.end == 150


def test_a_writer_that_scatters_is_not_followed():
    front = WrittenFront()
    results = [front.add(1000 * (i + 1), 10) for i in range(MAX_GAPS + 1)]
    assert all(results[:MAX_GAPS])
    assert results[MAX_GAPS] is False
    assert front.end == 0
