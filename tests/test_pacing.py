"""The bandwidth limit: the token bucket's accounting over simulated time, how a limit
is written, and a paced ``rpc.Peer`` (urgent frames first, never past the limit)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_rpc import pair

from topyaz_mount.client.config import parse_bwlimit
from topyaz_mount.errors import UsageError
from topyaz_mount.wire import proto
from topyaz_mount.wire.pacing import TokenBucket, bucket

RATE = 1 << 20


def _send_flat_out(b: TokenBucket, pieces: list[int], start: float = 0.0) -> list[float]:
    """A sender that sends each piece as soon as the bucket lets it: the send times."""
    now, times = start, []
    for size in pieces:
        now += b.delay(size, now)
        times.append(now)
    return times


def test_a_busy_sender_gets_the_rate_and_never_more_than_burst_plus_rate_times_t():
    b = TokenBucket(RATE, burst=64 << 10)
    pieces = [16 << 10] * 2000  # 31.25 MiB
    times = _send_flat_out(b, pieces)
    sent = 0
    for size, at in zip(pieces, times, strict=True):
        sent += size
        assert sent <= b.burst + RATE * at + 1e-6 * RATE
    # The whole: 31.25 MiB less the first burst, at 1 MiB/s.
    assert times[-1] == pytest.approx((sum(pieces) - b.burst) / RATE, rel=1e-9)


def test_the_first_burst_goes_at_once_and_idle_time_earns_no_more_than_burst():
    b = TokenBucket(RATE, burst=64 << 10)
    assert _send_flat_out(b, [16 << 10] * 4) == [0.0] * 4  # the burst: no wait
    assert b.delay(16 << 10, 0.0) == pytest.approx((16 << 10) / RATE)
    # A long pause refills the bucket to the burst, not beyond.
    times = _send_flat_out(b, [16 << 10] * 5, start=1000.0)
    assert times[:4] == [1000.0] * 4
    assert times[4] > 1000.0


def test_a_piece_bigger_than_the_burst_goes_and_the_debt_is_paid_after():
    b = TokenBucket(RATE, burst=16 << 10)
    assert b.delay(1 << 20, 0.0) == pytest.approx(((1 << 20) - (16 << 10)) / RATE)
    # The next byte waits for the whole debt, measured from the same moment.
    assert b.delay(1, 0.5) == pytest.approx(((1 << 20) - (16 << 10) + 1) / RATE - 0.5)


def test_default_burst_and_quantum():
    assert TokenBucket(2 << 20).burst == (2 << 20) // 10
    assert TokenBucket(1000).burst == 16 << 10  # never below one small piece
    assert TokenBucket(1 << 30).quantum == 256 << 10  # urgent frames wait at most this
    assert bucket(0) is None
    with pytest.raises(ValueError):
        TokenBucket(0)


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("10M", (10 << 20, 10 << 20)),
        ("500k", (500 << 10, 500 << 10)),
        ("1M:10M", (1 << 20, 10 << 20)),
        (":5M", (0, 5 << 20)),
        ("2M:", (2 << 20, 0)),
        ("0", (0, 0)),
        ("123", (123, 123)),
    ],
)
def test_parse_bwlimit(text, limit):
    assert parse_bwlimit(text) == limit


@pytest.mark.parametrize("text", ["fast", "1M:slow", "-1M", "1M:2M:3M"])
def test_parse_bwlimit_refuses_with_one_line(text):
    with pytest.raises(UsageError, match="--bwlimit"):
        parse_bwlimit(text)


def test_a_paced_peer_sends_at_the_rate_and_an_urgent_frame_overtakes_bulk():
    """Under a mock clock: 4 MiB of bulk notifications at 1 MiB/s, then an urgent one;
    the urgent one waits only for the bulk frame already begun, and the bulk bytes arrive
    no sooner than the bucket allows."""
    arrived: list[tuple[float, object]] = []

    async def record(msg):
        arrived.append((trio.current_time(), msg))

    async def body():
        async with pair(b_notice=record) as (a, b, _):
            a.peer.pacer = TokenBucket(RATE)
            start = trio.current_time()
            for i in range(16):
                await a.peer.notify(proto.Log("info", "x" * (256 << 10), i), proto.PRIO_BULK)
            await trio.sleep(1.0)
            urgent_at = trio.current_time()
            await a.peer.notify(proto.Log("info", "now", 99), proto.PRIO_URGENT)
            while len(arrived) < 17:
                await trio.sleep(0.1)
            return start, urgent_at

    start, urgent_at = trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))
    order = [msg.job for _, msg in arrived]
    assert sorted(order) == [*range(16), 99]
    assert order.index(99) < 8  # ahead of most of the bulk queued before it
    urgent_arrival = next(t for t, msg in arrived if msg.job == 99)
    quantum = TokenBucket(RATE).quantum
    # It waits for the bulk frame already begun (256 KiB) and one piece, no more.
    assert urgent_arrival - urgent_at <= ((256 << 10) + 4096 + quantum) / RATE
    last_bulk = max(t for t, msg in arrived if msg.job != 99)
    total = 16 * (256 << 10) - TokenBucket(RATE).burst
    assert last_bulk - start >= total / RATE


def test_the_limit_comes_from_the_flag_over_the_host_profile(tmp_path, monkeypatch):
    from topyaz_mount.api import RemoteHost
    from topyaz_mount.cli import _settings
    from topyaz_mount.client.config import HostOptions, save_profile

    monkeypatch.setenv("TOPYAZ_MOUNT_CONFIG", str(tmp_path / "config.toml"))
    save_profile("gpu", HostOptions(bwlimit="1M:4M"))
    assert _settings("gpu", (), None, None, None, 0).bwlimit == (1 << 20, 4 << 20)
    flag = _settings("gpu", (), None, None, None, 0, bwlimit="500k")
    assert flag.bwlimit == (500 << 10, 500 << 10)
    assert _settings("other", (), None, None, None, 0).bwlimit == (0, 0)
    assert RemoteHost.parse("gpu").settings().bwlimit == (1 << 20, 4 << 20)  # the API too
    save_profile("bad", HostOptions(bwlimit="fast"))
    with pytest.raises(UsageError, match=r"hosts\.bad\.bwlimit = 'fast'"):  # test_config
        _settings("bad", (), None, None, None, 0)
