"""The parts of `topyaz-mount attach` (issue 14) that need no host: the client's record
of a session (detached.py), the agent's replay of what a dead client missed
(agent/replay.py), a commit sent again after a takeover (fileserver), and the
`status --remote` lines. The whole path, with a killed client: test_reconnect_e2e."""

from __future__ import annotations

import json
import os
import re
import stat
import time

import blake3
import pytest
import trio

from topyaz_mount.agent import replay
from topyaz_mount.cli import _print_detachable
from topyaz_mount.client import detached
from topyaz_mount.client.fileserver import FileServer
from topyaz_mount.errors import UsageError
from topyaz_mount.wire import proto


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPYAZ_MOUNT_RUNTIME_DIR", str(tmp_path / "rt"))
    return tmp_path / "rt"


def _record() -> detached.Record:
    return detached.Record("abc123", "f" * 32, "me@gpu:2222", "/data", ["*.raw"], [], False)


def test_the_record_is_private_and_follows_the_output(runtime):
    w = detached.Writer(_record())
    path = runtime / "detached" / "abc123.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    w.ran(["tpai", "a.jpg"])
    w.wrote(1, 1, 300)
    w.wrote(1, 1, 9)
    w.wrote(1, 2, 5)
    again = detached.load("abc123")
    assert again.secret == "f" * 32 and again.command == ["tpai", "a.jpg"]
    assert sorted(again.offset_list()) == [[1, 1, 309], [1, 2, 5]]
    assert again.pid == os.getpid() and not detached.client_alive(again)  # we are it
    w.remove()
    assert not path.exists()
    with pytest.raises(UsageError, match="unknown session abc123"):
        detached.load("abc123")
    with pytest.raises(UsageError, match="not a session id"):
        detached.load("../etc/passwd")


def test_the_replay_sends_what_the_client_lacks_then_the_status(monkeypatch):
    monkeypatch.setattr(replay, "LIMIT", 10)
    r = replay.Replay()
    r.output(1, 1, b"0123456789")
    r.output(1, 1, b"abcde")  # the first 5 bytes are no longer kept
    r.output(1, 2, b"err")
    r.exited(proto.Exited(1, 7))
    msgs = list(r.messages([[1, 1, 12], [1, 2, 3]]))
    assert msgs == [proto.Output(1, 1, b"cde"), proto.Exited(1, 7)]
    msgs = list(r.messages([[1, 1, 2]]))
    assert isinstance(msgs[0], proto.Log) and "3 bytes of the job's stdout" in msgs[0].text
    assert msgs[1:] == [
        proto.Output(1, 1, b"56789abcde"),
        proto.Output(1, 2, b"err"),
        proto.Exited(1, 7),
    ]


def test_a_commit_the_dead_client_landed_is_not_landed_twice(tmp_path, monkeypatch):
    """The agent sends a commit again after a takeover; the destination already holds
    exactly its bytes (the old client landed it): no conflict copy, no temporary."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    data = b"remote output" * 1000
    (root / "out" / "r.bin").write_bytes(data)  # what the dead client committed
    server = FileServer(root)
    try:
        trio.run(server.handle, proto.CommitBegin(9, b"out/r.bin", 0o644, None, True))
        server.handle_chunk(proto.CommitChunk(9, 0, data))
        res = trio.run(
            server.handle, proto.CommitEnd(9, len(data), blake3.blake3(data).digest())
        )
    finally:
        server.close()
    assert res.path == b"out/r.bin"
    assert sorted(os.listdir(root / "out")) == ["r.bin"]
    assert (root / "out" / "r.bin").read_bytes() == data


def test_status_remote_lines(capsys):
    now = time.time()
    sessions = [
        {"session": "s1", "root": "/data", "grace_seconds": 900, "detached_since": now - 60,
         "command": ["tpai a.jpg"], "since": now - 600, "jobs": 1},
        {"session": "s2", "root": "/x", "grace_seconds": 900, "detached_since": None,
         "command": [], "jobs": 0},
    ]
    _print_detachable(sessions, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("s1: tpai a.jpg (in /data), up since ")
    assert re.search(r"detached for 1 min \d+ s, 1[34] min \d+ s of grace left$", lines[0])
    assert lines[1] == "s2: - (in /x), attached"
    _print_detachable(sessions, as_json=True)
    assert json.loads(capsys.readouterr().out)[0]["session"] == "s1"
