"""A hostile agent against the real client (issue 11, items 4 and 6).

The agent end is the project's own protocol code (tests/hostile_agent.py); the client end
is client.Session, FileServer and rpc.Peer as a real session wires them. Every test
checks that the client refused, stayed within its bounds, and that nothing changed on
disk outside what a job may write: the root and a sibling directory are snapshotted byte
for byte before and after. (Protected paths and mode bits are the write policy's tests.)
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
import trio
from hostile_agent import RawAgent, Tree, client_and_agent, session_for, socket_streams

from topyaz_mount.client import fileserver
from topyaz_mount.client.fileserver import FileServer, OpenCaps
from topyaz_mount.errors import ConnectionFailed
from topyaz_mount.wire import proto, rpc
from topyaz_mount.wire.rpc import RemoteError

pytestmark = pytest.mark.both_os_calls

DEADLINE = 120
REPO = Path(__file__).resolve().parent.parent


def run(body, *args):
    async def main():
        with trio.fail_after(DEADLINE):
            return await body(*args)

    return trio.run(main)


@pytest.fixture
def world(tmp_path):
    """A root with inputs and an earlier output, and a sibling the job must never touch."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "out").mkdir()
    (root / "in.txt").write_bytes(b"input bytes\n")
    (root / "out" / "old.txt").write_bytes(b"the previous output\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not for the remote\n")
    os.chmod(outside / "secret.txt", 0o600)
    return root, outside


async def refused(agent, req) -> int:
    """The errno the client answered ``req`` with (the test fails if it was served)."""
    with pytest.raises(RemoteError) as info:
        await agent.call(req)
    return info.value.errno


async def commit(agent, cid: int, path: bytes, data: bytes, *, size=None, digest=None):
    await agent.call(proto.CommitBegin(cid, path, 0o644), proto.PRIO_BULK)
    for i in range(0, len(data), proto.CHUNK_SIZE):
        chunk = data[i : i + proto.CHUNK_SIZE]
        await agent.notify(proto.CommitChunk(cid, i, chunk), proto.PRIO_BULK)
    end = proto.CommitEnd(
        cid,
        len(data) if size is None else size,
        blake3.blake3(data).digest() if digest is None else digest,
    )
    return await agent.call(end, proto.PRIO_BULK, after_bulk=True)


# --- paths that try to leave the root ---------------------------------------------------

BAD_PATHS = [
    b"..",
    b"../outside/secret.txt",
    b"/etc/passwd",
    b"sub/../../outside/secret.txt",
    b"in.txt\x00../../outside",
    b"sub//in.txt",
    b"./in.txt",
    b"a" * 5000,
    b"n" * 300,
]


def _requests_on(path: bytes) -> list:
    return [
        proto.Stat(path),
        proto.ListDir(path),
        proto.OpenRead(path),
        proto.ReadLink(path),
        proto.Mkdir(path, 0o755),
        proto.Rmdir(path),
        proto.Unlink(path),
        proto.Rename(b"in.txt", path),
        proto.Rename(path, b"sub/stolen"),
        proto.SetAttr(path, mode=0o777),
        proto.Symlink(path, b"in.txt"),
        proto.CommitBegin(1, path, 0o644),
    ]


@pytest.mark.parametrize("path", BAD_PATHS, ids=repr)
def test_paths_outside_the_root_are_refused_for_every_request(world, path):
    root, outside = world
    before = Tree(root.parent)

    async def body():
        async with client_and_agent(root) as (_, agent):
            for req in _requests_on(path):
                code = await refused(agent, req)
                assert code in (errno.EPERM, errno.EINVAL, errno.ENAMETOOLONG), (req, code)

    run(body)
    assert before.changes() == {}


def test_the_root_itself_cannot_be_removed_renamed_or_replaced(world):
    root, _ = world
    before = Tree(root.parent)

    async def body():
        async with client_and_agent(root) as (_, agent):
            for req in (
                proto.Rmdir(b""),
                proto.Unlink(b""),
                proto.Rename(b"", b"sub/x"),
                proto.Rename(b"sub", b""),
                proto.CommitBegin(1, b"", 0o644),
            ):
                await refused(agent, req)

    run(body)
    assert before.changes() == {}


def test_unicode_and_non_utf8_names_land_exactly_inside_the_root(world):
    root, outside = world
    names = [b"out/\xc3\xa9t\xc3\xa9 \xe2\x80\xae.txt", b"out/\xff\xfe raw", b"out/\x1b[2J"]
    before = Tree(root.parent)

    async def body():
        async with client_and_agent(root) as (_, agent):
            for cid, name in enumerate(names, 1):
                done = await commit(agent, cid, name, name * 3)
                assert done.path == name

    run(body)
    paths = [os.fsencode(root) + b"/" + name for name in names]
    assert set(before.changes()) == {os.fsdecode(p) for p in paths}
    for path, name in zip(paths, names, strict=True):
        with open(path, "rb") as f:
            assert f.read() == name * 3


def test_a_planted_symlink_is_never_followed(world):
    root, outside = world
    before_outside = Tree(outside)

    async def body():
        async with client_and_agent(root) as (_, agent):
            # The write policy refuses to plant a link that leads out of the root ...
            for target in (os.fsencode(outside), b".."):
                await refused(agent, proto.Symlink(b"evil", target))
            # ... and links already there (the user's, or from before) are never followed.
            os.symlink(outside, root / "evil")
            os.symlink(outside / "secret.txt", root / "evil_file")
            os.symlink("..", root / "up")
            for req in (
                proto.CommitBegin(1, b"evil/planted", 0o644),
                proto.CommitBegin(2, b"up/outside/planted", 0o644),
                proto.Mkdir(b"evil/d", 0o755),
                proto.OpenRead(b"evil/secret.txt"),
                proto.OpenRead(b"evil_file"),
                proto.ListDir(b"evil"),
                proto.Unlink(b"evil/secret.txt"),
                proto.Rename(b"in.txt", b"evil/in.txt"),
                proto.Rename(b"evil/secret.txt", b"stolen"),
                proto.Symlink(b"evil/link", b"x"),
                proto.SetAttr(b"evil/secret.txt", mode=0o666),
            ):
                await refused(agent, req)
            # A chmod or a write aimed at the link acts on the link, never the target.
            try:
                await agent.call(proto.SetAttr(b"evil_file", mode=0o666))
            except RemoteError:
                pass
            await commit(agent, 3, b"evil_file", b"replaces the link\n")

    run(body)
    assert before_outside.changes() == {}
    assert (root / "evil_file").read_bytes() == b"replaces the link\n"
    assert not (root / "evil_file").is_symlink()


def test_fifos_and_devices_are_neither_opened_nor_listed(world):
    root, _ = world
    os.mkfifo(root / "pipe")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    before = Tree(root.parent)

    async def body():
        async with client_and_agent(root) as (_, agent):
            with trio.fail_after(10):  # a FIFO opened for reading would block here
                for name in (b"pipe", b"null"):
                    await refused(agent, proto.OpenRead(name))
                    await refused(agent, proto.ListDir(name))
            listing = await agent.call(proto.ListDir(b""))
            assert {e.name for e in listing.entries} == {b"in.txt", b"out", b"sub"}

    run(body)
    assert before.changes() == {}


def test_requests_on_handles_it_never_opened(world):
    root, _ = world
    before = Tree(root.parent)

    async def body():
        async with client_and_agent(root) as (session, agent):
            assert await refused(agent, proto.ReadChunk(12345, 0, 10)) == errno.EBADF
            assert await refused(agent, proto.CommitEnd(777, 0, b"\0" * 32)) == errno.EBADF
            await agent.notify(proto.CommitChunk(555, 0, b"into nothing"))
            assert await agent.call(proto.CommitAbort(555)) == proto.Done()
            assert await agent.call(proto.CloseRead(999)) == proto.Done()
            opened = await agent.call(proto.OpenRead(b"in.txt"))
            for offset, length in ((-1, 10), (0, -1), (0, 4 * proto.CHUNK_SIZE + 1)):
                req = proto.ReadChunk(opened.handle, offset, length)
                assert await refused(agent, req) == errno.EINVAL
            await agent.call(proto.CloseRead(opened.handle))
            assert await refused(agent, proto.ReadChunk(opened.handle, 0, 1)) == errno.EBADF
            assert not session.peer.closed

    run(body)
    assert before.changes() == {}


# --- floods and bounds ------------------------------------------------------------------


def test_a_flood_of_namespace_requests_is_remembered_within_a_bound(world, monkeypatch):
    root, _ = world
    monkeypatch.setattr(fileserver, "MAX_MADE", 100)
    before = Tree(root.parent)

    async def body():
        async with client_and_agent(root) as (session, agent):
            for i in range(300):
                await agent.call(proto.Mkdir(b"sub/d%d" % i, 0o755))
                await agent.call(proto.Rmdir(b"sub/d%d" % i))
            assert len(session.server.made) == 100
            assert b"sub/d299" in session.server.made  # the newest are kept

    run(body)
    assert before.changes() == {}


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the present size


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise AssertionError(field)


def test_a_flood_of_urgent_reads_never_drained_is_bounded_and_ends_the_session(world, monkeypatch):
    """4000 urgent 4 MiB reads whose replies the agent never reads: 16 GB if unbounded."""
    root, _ = world
    (root / "big.bin").write_bytes(os.urandom(4 * proto.CHUNK_SIZE))
    monkeypatch.setattr(rpc, "STALL_TIMEOUT", 3.0)
    before = Tree(root.parent)
    peak_held = 0

    async def body():
        nonlocal peak_held
        client_end, agent_end = socket_streams()
        server = FileServer(root)
        agent = RawAgent(agent_end)
        try:
            async with trio.open_nursery() as nursery:
                session = session_for(client_end, server, nursery)
                nursery.start_soon(agent.handshake)
                await session._handshake(10)
                opened = await agent.call(proto.OpenRead(b"big.bin"))
                handle = opened.res.handle

                async def flood():
                    for _ in range(4000):
                        read = proto.ReadChunk(handle, 0, 4 * proto.CHUNK_SIZE)
                        await agent.send(agent.call_frame(read))

                _peak_rss_reset()
                rss_before = _rss("VmRSS")
                nursery.start_soon(flood)
                while not session.lost.is_set():
                    assert session.peer is not None
                    peak_held = max(peak_held, session.peer.held_bytes)
                    await trio.sleep(0.01)
                rss_growth = _rss("VmHWM") - rss_before
                assert isinstance(session.failure, rpc.PeerStalled)
                message = session.loss_message()
                assert "the agent stopped reading its replies; giving up" in message
                nursery.cancel_scope.cancel()
        finally:
            server.close()
        return rss_growth

    rss_growth = run(body)
    bound = (64 << 20) + proto.MAX_FRAME + (16 << 20)
    assert 0 < peak_held <= bound
    assert rss_growth < bound + (64 << 20), rss_growth
    assert before.changes() == {}


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # a 4 GiB frame announced: refused before buffering any of it
        b"\x00\x00\x00\x05hello",
        proto._LEN.pack(3) + b"\x93\x01\x02",  # msgpack, but not a frame
        proto.encode(proto.Notify(proto.Output(1, 1, b"x")))[:-1] + b"\xc1" + b"\x00" * 4,
    ],
    ids=["huge-length", "not-msgpack", "not-a-frame", "truncated-then-junk"],
)
def test_garbage_frames_end_the_session_with_a_protocol_error(world, garbage):
    root, _ = world
    before = Tree(root.parent)

    async def body():
        client_end, agent_end = socket_streams()
        server = FileServer(root)
        agent = RawAgent(agent_end)
        try:
            async with trio.open_nursery() as nursery:
                session = session_for(client_end, server, nursery)
                nursery.start_soon(agent.handshake)
                await session._handshake(10)
                await agent.stream.send_all(garbage)
                await session.lost.wait()
                assert isinstance(session.failure, proto.ProtocolError)
                assert "the agent broke the protocol" in session.loss_message()
                nursery.cancel_scope.cancel()
        finally:
            server.close()

    run(body)
    assert before.changes() == {}


def test_a_silent_agent_fails_the_connection_in_one_line(world):
    root, _ = world

    async def body():
        client_end, agent_end = socket_streams()
        server = FileServer(root)
        try:
            async with trio.open_nursery() as nursery:
                session = session_for(client_end, server, nursery)
                with pytest.raises(ConnectionFailed, match="no answer from hostile within 1 s"):
                    await session._handshake(1)
                nursery.cancel_scope.cancel()
        finally:
            server.close()

    run(body)


# --- the disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs holding the root and a sibling; unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "root" / "out").mkdir(parents=True)
        (mnt / "root" / "out" / "old.txt").write_bytes(b"the previous output\n")
        (mnt / "outside").mkdir()
        (mnt / "outside" / "secret.txt").write_bytes(b"not for the remote\n")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_commit_past_the_disk_cap_fails_with_enospc_and_leaves_nothing(small_disk):
    root = small_disk / "root"
    before = Tree(small_disk)
    free_before = _free(small_disk)
    data = os.urandom(30 << 20)  # more than the cap: 3/4 of the 32 MiB free

    async def body():
        async with client_and_agent(root) as (session, agent):
            with pytest.raises(RemoteError) as info:
                await commit(agent, 1, b"out/big.bin", data)
            assert info.value.errno == errno.ENOSPC
            assert "disk cap" in info.value.strerror
            assert session.server.commit_bytes_in_flight() == 0
            assert _free(small_disk) == free_before  # the temporary data went at once

    run(body)
    assert before.changes() == {}
    assert _free(small_disk) == free_before


def test_commits_in_flight_share_one_disk_cap(small_disk):
    root = small_disk / "root"
    before = Tree(small_disk)
    first, second = os.urandom(14 << 20), os.urandom(14 << 20)

    async def body():
        async with client_and_agent(root) as (session, agent):
            for cid, path in ((1, b"out/a.bin"), (2, b"out/b.bin")):
                await agent.call(proto.CommitBegin(cid, path, 0o644), proto.PRIO_BULK)
            for i in range(0, len(first), proto.CHUNK_SIZE):  # interleaved, as two writers
                for cid, data in ((1, first), (2, second)):
                    chunk = data[i : i + proto.CHUNK_SIZE]
                    await agent.notify(proto.CommitChunk(cid, i, chunk), proto.PRIO_BULK)
            outcomes = []
            for cid, data in ((1, first), (2, second)):
                end = proto.CommitEnd(cid, len(data), blake3.blake3(data).digest())
                try:
                    outcomes.append(await agent.call(end, proto.PRIO_BULK, after_bulk=True))
                except RemoteError as e:
                    outcomes.append(e.errno)
            assert errno.ENOSPC in outcomes, outcomes
            # the other one arrived whole; a later commit fits again
            await commit(agent, 3, b"out/small.txt", b"fits\n")

    run(body)
    changes = before.changes()
    landed = {p for p, (was, _) in changes.items() if was is None}
    assert set(changes) == landed  # nothing removed or changed, only outputs added
    assert os.fsdecode(root / "out" / "small.txt") in landed
    big = landed - {os.fsdecode(root / "out" / "small.txt")}
    assert len(big) == 1
    (path,) = big
    assert Path(path).read_bytes() == (first if path.endswith("a.bin") else second)


def test_a_commit_whose_size_or_hash_lies_changes_nothing(world):
    root, _ = world
    before = Tree(root.parent)

    async def body():
        async with client_and_agent(root) as (_, agent):
            for cid, kw in enumerate(({"size": 3}, {"size": 10**9}, {"digest": b"\0" * 32}), 1):
                with pytest.raises(RemoteError) as info:
                    await commit(agent, cid, b"out/old.txt", b"a new output\n", **kw)
                assert info.value.errno == errno.EIO

    run(body)
    assert before.changes() == {}


# --- exit status ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote_code", "local_code"),
    [(0, 0), (1, 1), (137, 137), (255, 255), (256, 255), (-1, 255), (1000, 255), (2**40, 255)],
)
def test_exit_status_is_clamped_to_0_255(world, remote_code, local_code):
    root, _ = world
    warnings: list[str] = []

    async def job(agent, run_req):
        await agent.notify(proto.Exited(run_req.job, remote_code))

    async def body():
        async with client_and_agent(root, job) as (session, _):
            session.on_warning = warnings.append
            result = await session.run(["true"], stdout=lambda b: None, stderr=lambda b: None)
            assert result.exit_code == local_code
            assert result.warnings == warnings

    run(body)
    if local_code != remote_code:
        note = f"the remote reported exit status {remote_code}, not 0-255; exiting 255"
        assert warnings == [note]
    else:
        assert warnings == []


# --- file descriptors ---------------------------------------------------------------------


def test_caps_leave_fds_for_listings_and_commits():
    for limit in (256, 1024, 4096, 1 << 20):
        caps = OpenCaps.for_limit(limit)
        assert 2 * caps.reads + 2 * caps.commits <= limit - 64


_FD_SCRIPT = """
import errno, os, resource, sys, trio, blake3
from pathlib import Path
from topyaz_mount.wire import proto
from topyaz_mount.client.fileserver import FileServer
soft, hard = (int(x) for x in sys.argv[2:4])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
server = FileServer(Path(sys.argv[1]))
print("limit", resource.getrlimit(resource.RLIMIT_NOFILE)[0], server.caps.reads)
def call(req):
    return trio.run(server.handle, req)
opened = 0
try:
    for _ in range(5000):
        call(proto.OpenRead(b"in.txt"))
        opened += 1
except OSError as e:
    assert e.errno == errno.EMFILE, e
print("opened", opened)
assert len(call(proto.ListDir(b"")).entries) == 3
for cid in range(1, 9):
    call(proto.CommitBegin(cid, b"out/c%d.txt" % cid, 0o644))
    server.handle_chunk(proto.CommitChunk(cid, 0, b"data"))
    call(proto.CommitEnd(cid, 4, blake3.blake3(b"data").digest()))
print("committed")
server.close()
"""


@pytest.mark.parametrize(("soft", "hard"), [(1024, 1024), (256, 256), (1024, 4096)])
def test_a_low_fd_limit_still_leaves_room_for_listings_and_commits(world, soft, hard):
    """Reads held open up to the cap: listings and commits still get their fds."""
    root, _ = world
    out = subprocess.run(
        [sys.executable, "-c", _FD_SCRIPT, str(root), str(soft), str(hard)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    _, limit, reads_cap = lines[0].split()
    assert int(limit) == hard  # the soft limit was raised to the hard one
    assert lines[1] == f"opened {reads_cap}"
    assert int(reads_cap) == OpenCaps.for_limit(hard).reads
    assert lines[2] == "committed"
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted(
        ["old.txt"] + [f"c{i}.txt" for i in range(1, 9)]
    )


# --- through the real command line --------------------------------------------------------


CLI = [sys.executable, "-m", "topyaz_mount"]
# The same command line, with the stall deadline at 2 s; it writes its peak RSS at exit.
CLI_QUICK_STALL = [
    sys.executable,
    "-c",
    "import atexit, os, sys, topyaz_mount.wire.rpc as rpc\n"
    "rpc.STALL_TIMEOUT = 2.0\n"
    "def peak():\n"
    "    with open('/proc/self/status') as f, open(os.environ['PEAK_FILE'], 'w') as out:\n"
    "        out.write(next(x for x in f if x.startswith('VmHWM:')).split()[1])\n"
    "atexit.register(peak)\n"
    "from topyaz_mount.cli import main\n"
    "sys.argv[0] = 'topyaz-mount'\n"
    "main()\n",
]
ESCAPED = "\\x1b]52;c;aGFjaw==\\x07\\x1b[2J\\x0atopyaz-mount: all outputs committed"


def _cli_with_hostile_ssh(tmp_path: Path, cwd: Path, *args: str, cli=CLI, **env: str):
    """The real command line, whose ``ssh`` runs tests/hostile_agent.py instead."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_ssh = bin_dir / "ssh"
    agent = REPO / "tests" / "hostile_agent.py"
    fake_ssh.write_text(f'#!/bin/sh\nexec {sys.executable} {agent} "$@"\n')
    fake_ssh.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    # The hostile agent speaks the session protocol straight on the channel: no
    # detachable session (its attach line), so no grace.
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "TOPYAZ_MOUNT_REMOTE": "gpu",
           "TOPYAZ_MOUNT_GRACE": "0", **env}
    # One-shot: a session left up (persist.py) would outlive the test with its hostile agent.
    env.setdefault("TOPYAZ_MOUNT_PERSIST", "0")
    return subprocess.run(
        [*cli, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=DEADLINE,
        check=False,
    )


def _no_control_characters(text: bytes) -> None:
    for control in (b"\x1b", b"\x07", b"\r"):
        assert control not in text


@pytest.mark.parametrize(("remote_code", "local_code"), [(256, 255), (3, 3)])
def test_the_command_line_escapes_remote_text_and_clamps_the_status(
    world, tmp_path, remote_code, local_code
):
    """A fake ssh runs the hostile agent: its text in our lines (hostile_agent.NASTY) is
    shown as escapes, the job's own stdout passes untouched, and 256 is 255, not success."""
    root, outside = world
    before = Tree(root, outside)
    out = _cli_with_hostile_ssh(
        tmp_path, root, "exec", "--", "true", HOSTILE_EXIT_CODE=str(remote_code)
    )
    assert out.returncode == local_code, out.stderr
    assert out.stdout == b"job stdout \x1b[31mred\x1b[0m\n"  # the job's own bytes, untouched
    _no_control_characters(out.stderr)
    lines = out.stderr.decode().splitlines()
    assert all(line.startswith("topyaz-mount: ") for line in lines), lines
    assert "topyaz-mount: all outputs committed" not in lines
    assert f"topyaz-mount: warning: remote says {ESCAPED}" in lines
    assert f"topyaz-mount: error: out/{ESCAPED}: not written" in lines
    if remote_code != local_code:
        assert (
            "topyaz-mount: warning: the remote reported exit status 256, not 0-255; exiting 255"
            in lines
        )
    assert before.changes() == {}


@pytest.mark.parametrize("command", ["doctor", "cache"])
def test_doctor_and_cache_show_the_agents_answer_as_escapes(tmp_path, command):
    out = _cli_with_hostile_ssh(tmp_path, tmp_path, command)
    _no_control_characters(out.stdout + out.stderr)
    lines = out.stdout.decode().splitlines()
    assert "topyaz-mount: all outputs committed" not in lines
    assert out.returncode == 0, out.stderr
    if command == "doctor":
        assert lines[-1] == f"ok   fuse {ESCAPED}: {ESCAPED}"
    else:
        assert lines[:2] == [f"cache at {ESCAPED} on gpu", f"  objects  {ESCAPED}"]
        assert lines[3].startswith("  hit rate 50.0 % (" + ESCAPED + " hits")


def test_an_error_text_from_the_agent_is_one_escaped_line(world, tmp_path):
    root, outside = world
    before = Tree(root, outside)
    out = _cli_with_hostile_ssh(tmp_path, root, "exec", "--", "true", HOSTILE_RUN_FAILS="1")
    assert out.returncode == 127  # the remote's "not found", as a shell says it
    _no_control_characters(out.stderr)
    assert out.stderr.decode().splitlines() == [f"topyaz-mount: on gpu: no such program {ESCAPED}"]
    assert before.changes() == {}


# --- the real agent, past the client's disk cap ----------------------------------------------


@pytest.mark.e2e
def test_an_output_past_the_disk_cap_is_refused_named_and_leaves_nothing(testhost, small_disk):
    """A job's output bigger than the cap: exit non-zero naming it, the root untouched."""
    from e2e_util import describe, run_exec

    root = small_disk / "root"
    before = Tree(small_disk)
    free_before = _free(small_disk)
    result = run_exec(
        testhost, root, "sh", "-c", "head -c 30000000 /dev/zero > out/big.bin && echo written"
    )
    assert result.returncode not in (0, None), describe(result)
    assert result.stdout == b"written\n", describe(result)
    err = result.stderr.decode()
    assert "out/big.bin: not written on the client" in err, describe(result)
    assert "disk cap" in err, describe(result)
    assert before.changes() == {}
    assert _free(small_disk) == free_before
    kept = Path(err.rsplit("kept on the remote host at ", 1)[1].split()[0])
    try:  # the output is whole on the remote
        assert kept.read_bytes() == bytes(30000000)
    finally:
        shutil.rmtree(kept.parent.parent)  # kept/<session>/ of this run


def test_the_command_line_gives_up_on_an_agent_that_floods_and_never_reads(world, tmp_path):
    root, outside = world
    (root / "in.txt").write_bytes(os.urandom(4 * proto.CHUNK_SIZE))
    before = Tree(root, outside)
    peak_file = tmp_path / "peak"
    out = _cli_with_hostile_ssh(
        tmp_path,
        root,
        "exec",
        "--",
        "true",
        cli=CLI_QUICK_STALL,
        HOSTILE_FLOOD="1",
        PEAK_FILE=str(peak_file),
    )
    assert out.returncode == 255, out.stderr
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("topyaz-mount: connection to gpu lost during the job (the agent ")
    assert "(the agent stopped reading its replies; giving up)" in lines[0]
    peak = int(peak_file.read_text()) << 10
    assert peak < 300 << 20, peak  # 16 GB asked for; the bound is about 100 MiB
    assert before.changes() == {}
