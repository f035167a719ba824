"""control.py: the session's control socket messages, runtime dir and names."""

from __future__ import annotations

import os
import stat

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from topyaz_mount.client import control, runtime
from topyaz_mount.errors import UsageError

pytestmark = pytest.mark.both_os_calls

TEXT = st.text(max_size=50)
MESSAGES = st.one_of(
    st.builds(control.Exec, st.lists(TEXT, max_size=5), TEXT,
              st.dictionaries(TEXT, TEXT, max_size=3), st.booleans(),
              st.lists(TEXT, max_size=3),
              st.none() | st.lists(st.integers(0, 65535), min_size=2, max_size=2)),
    st.builds(control.StdinData, st.binary(max_size=300)),
    st.builds(control.StdinClose),
    st.builds(control.SignalJob, st.integers(1, 64)),
    st.builds(control.Resize, st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(control.Query),
    st.builds(control.Unmount, st.booleans()),
    st.builds(control.Output, st.sampled_from([1, 2]), st.binary(max_size=300)),
    st.builds(control.Note, TEXT),
    st.builds(control.Finished, st.integers(0, 255), st.lists(TEXT, max_size=3),
              st.dictionaries(TEXT, st.floats(allow_nan=False), max_size=3)),
    st.builds(control.Failed, TEXT, st.integers(0, 255)),
    st.builds(control.Unmounted, st.integers(0, 99), st.integers(0, 1 << 40), TEXT),
)


@given(st.lists(MESSAGES, max_size=8), st.integers(1, 50))
def test_messages_cross_a_stream_intact_whatever_the_split(messages, piece):
    async def main():
        a, b = trio.testing.memory_stream_pair()
        sender, receiver = control.Channel(a), control.Channel(b)
        for m in messages:
            await sender.send(m)
        await a.send_all(b"")
        await sender.aclose()
        got = []
        while (m := await receiver.receive()) is not None:
            got.append(m)
        return got

    assert trio.run(main) == messages


def test_garbage_and_oversized_messages_are_refused():
    async def feed(data: bytes):
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(data)
        await a.aclose()
        return await control.Channel(b).receive()

    with pytest.raises(control.ControlError, match="malformed"):
        trio.run(feed, b"\x00\x00\x00\x03abc")
    with pytest.raises(control.ControlError, match="refused"):
        trio.run(feed, b"\xff\xff\xff\xff")
    assert trio.run(feed, b"") is None


def test_runtime_dir_is_private_and_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPYAZ_MOUNT_RUNTIME_DIR", str(tmp_path / "rt"))
    path = runtime.runtime_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    os.chmod(path, 0o755)
    runtime.runtime_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(path)
    monkeypatch.setenv("TOPYAZ_MOUNT_RUNTIME_DIR", str(link))
    with pytest.raises(control.ControlError, match="not a directory owned by you"):
        runtime.runtime_dir()


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "../up", "x" * 65, "sp ace"])
def test_bad_session_names_are_refused(name):
    with pytest.raises(UsageError):
        runtime.check_name(name)


@pytest.mark.parametrize("name", ["shots", "a.b_c-1", "X" * 64])
def test_good_session_names(name):
    assert runtime.check_name(name) == name


def test_connect_to_a_missing_or_stale_session_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPYAZ_MOUNT_RUNTIME_DIR", str(tmp_path / "rt"))
    with pytest.raises(control.ControlError, match="no session named gone"):
        trio.run(control.connect, "gone")

    async def stale():
        listener = await control.listen(runtime.socket_path("stale"))
        assert stat.S_IMODE(os.stat(runtime.socket_path("stale")).st_mode) == 0o600
        await listener.aclose()  # the socket file stays, nobody listens
        await control.connect("stale")

    with pytest.raises(control.ControlError, match="not running any more"):
        trio.run(stale)
    assert runtime.session_names() == ["stale"]
