"""A hostile agent for the tests: the project's own protocol code on the agent's end.

``HostileAgent`` answers what a real agent must (Hello, Run, Manifest, Bye) and lets a
test send the client anything else, driving the real client: ``client.Session``,
``FileServer`` and ``rpc.Peer``, over a socketpair (kernel buffers, so a side that stops
reading really pushes back). ``RawAgent`` speaks bare frames, for a peer that never reads
or sends garbage. ``Tree`` snapshots directories byte for byte.

Run as a program (``python3 tests/hostile_agent.py``) it is the agent at the end of a
fake ssh, on stdin/stdout, for the tests that go through the real command line.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from topyaz_mount.client.fileserver import FileServer
from topyaz_mount.client.session import Session
from topyaz_mount.client.transport import Remote, SshProcess, SshSettings
from topyaz_mount.wire import proto
from topyaz_mount.wire.rpc import Peer

MOUNTPOINT = "/remote/session"
JobScript = Callable[["HostileAgent", proto.Run], Awaitable[None]]


class HostileAgent:
    """The agent's end of a session; ``script`` plays the job once the client runs one."""

    def __init__(self, stream: trio.abc.Stream, script: JobScript | None = None) -> None:
        self.peer = Peer(stream, self._on_call, self._on_notice)
        self.script = script
        self.notices: list[Any] = []
        self.nursery: trio.Nursery | None = None

    async def _on_call(self, req: Any) -> Any:
        if isinstance(req, proto.Hello):
            return proto.Welcome(
                proto.PROTOCOL_VERSION, req.session_id, MOUNTPOINT, 4242, req.capabilities
            )
        if isinstance(req, proto.Run):
            if os.environ.get("HOSTILE_RUN_FAILS"):
                raise OSError(2, f"no such program {NASTY}")
            if self.script is not None and self.nursery is not None:
                self.nursery.start_soon(self.script, self, req)
            return proto.Started(4243)
        if isinstance(req, proto.Manifest):
            return proto.Missing([])
        if isinstance(req, proto.Bye):
            return proto.Closed()
        raise OSError(38, "not served by the hostile agent")

    async def _on_notice(self, msg: Any) -> None:
        self.notices.append(msg)

    async def call(self, req: Any, prio: int = proto.PRIO_URGENT, **kw: Any) -> Any:
        return await self.peer.call(req, prio, **kw)

    async def notify(self, msg: Any, prio: int = proto.PRIO_NORMAL) -> None:
        await self.peer.notify(msg, prio)


def socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


def session_for(stream: trio.abc.Stream, server: FileServer, nursery: trio.Nursery) -> Session:
    """A client Session whose channel is ``stream`` instead of an ssh process."""
    ssh = SshProcess(popen=None, stream=stream, stderr=None)  # type: ignore[arg-type]
    return Session(SshSettings(Remote("hostile")), server, ssh, nursery)


@asynccontextmanager
async def client_and_agent(
    root: Path, script: JobScript | None = None, server: FileServer | None = None
) -> AsyncIterator[tuple[Session, HostileAgent]]:
    """A handshaken client session on ``root`` and the hostile agent it talks to."""
    client_end, agent_end = socket_streams()
    server = server if server is not None else FileServer(root)
    agent = HostileAgent(agent_end, script)
    try:
        async with trio.open_nursery() as nursery:
            agent.nursery = nursery
            await agent_end.send_all(proto.MAGIC)
            nursery.start_soon(agent.peer.run)
            session = session_for(client_end, server, nursery)
            await session._handshake(10)
            yield session, agent
            nursery.cancel_scope.cancel()
    finally:
        server.close()


class RawAgent:
    """Bare frames on a stream: for an agent that sends garbage or never reads."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = proto.FrameDecoder()
        self.pending: list[proto.Frame] = []  # decoded, not yet taken (Hello and Run come together)
        self.next_rid = 1

    async def send(self, *frames: proto.Frame) -> None:
        await self.stream.send_all(b"".join(proto.encode(f) for f in frames))

    async def receive(self) -> proto.Frame:
        while True:
            self.pending += self.decoder.frames()
            if self.pending:
                return self.pending.pop(0)
            data = await self.stream.receive_some(1 << 16)
            assert data, "the client closed the connection"
            self.decoder.feed(data)

    def call_frame(self, req: Any, prio: int = proto.PRIO_URGENT) -> proto.Call:
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        return proto.Call(rid, prio, req)

    async def call(self, req: Any, prio: int = proto.PRIO_URGENT) -> Any:
        frame = self.call_frame(req, prio)
        await self.send(frame)
        reply = await self.receive()
        assert isinstance(reply, proto.Reply | proto.Fail) and reply.rid == frame.rid, reply
        return reply

    async def handshake(self) -> None:
        """Greet the client as an agent does: MAGIC, then answer its Hello."""
        await self.stream.send_all(proto.MAGIC)
        hello = await self.receive()
        assert isinstance(hello, proto.Call) and isinstance(hello.req, proto.Hello), hello
        welcome = proto.Welcome(proto.PROTOCOL_VERSION, hello.req.session_id, MOUNTPOINT, 1)
        await self.send(proto.Reply(hello.rid, welcome))


class Tree:
    """Every entry under some directories: type, mode, owner, and bytes or target."""

    def __init__(self, *dirs: Path) -> None:
        self.dirs = dirs
        self.entries = self._take()

    def _take(self) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for top in self.dirs:
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    path = os.path.join(dirpath, name)
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode):
                        with open(path, "rb") as f:
                            body: object = f.read()
                    elif stat.S_ISLNK(st.st_mode):
                        body = os.readlink(path)
                    elif stat.S_ISDIR(st.st_mode):
                        body = None  # its entries are listed themselves
                    else:
                        body = st.st_rdev
                    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
                    out[path] = (st.st_mode, st.st_uid, st.st_gid, size, body)
        return out

    def changes(self) -> dict[str, tuple]:
        """Entries added, removed or changed since the snapshot: path -> (before, after)."""
        now = self._take()
        return {
            p: (self.entries.get(p), now.get(p))
            for p in set(self.entries) | set(now)
            if self.entries.get(p) != now.get(p)
        }


# --- the program at the end of a fake ssh ----------------------------------------------

NASTY = "\x1b]52;c;aGFjaw==\x07\x1b[2J\ntopyaz-mount: all outputs committed"


async def _cli_scenario(agent: HostileAgent, run: proto.Run) -> None:
    """Control characters in every remote text, raw bytes on stdout, and status 256."""
    await agent.notify(proto.Output(run.job, 1, b"job stdout \x1b[31mred\x1b[0m\n"))
    await agent.notify(proto.Log("warning", f"remote says {NASTY}", run.job))
    code = int(os.environ.get("HOSTILE_EXIT_CODE", "256"))
    await agent.notify(proto.Exited(run.job, code, [f"out/{NASTY}: not written"]))


async def _flood(stream: trio.abc.Stream) -> None:
    """Once the job runs: 4000 urgent 4 MiB reads (16 GB of replies), none read."""
    agent = RawAgent(stream)
    await agent.handshake()
    run = await agent.receive()
    assert isinstance(run, proto.Call) and isinstance(run.req, proto.Run), run
    await agent.send(proto.Reply(run.rid, proto.Started(4243)))
    opened = await agent.call(proto.OpenRead(b"in.txt"))
    read = proto.ReadChunk(opened.res.handle, 0, 4 * proto.CHUNK_SIZE)
    for _ in range(4000):
        await agent.send(agent.call_frame(read))
    await trio.sleep_forever()


async def _serve_stdio() -> None:
    stream = trio.StapledStream(
        trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0))
    )
    if os.environ.get("HOSTILE_FLOOD"):
        await _flood(stream)
    agent = HostileAgent(stream, _cli_scenario)
    async with trio.open_nursery() as nursery:
        agent.nursery = nursery
        await stream.send_all(proto.MAGIC)
        await agent.peer.run()
        nursery.cancel_scope.cancel()


def _one_shot(mode: str) -> None:
    """``cache`` and ``doctor`` ask for one JSON object: its strings and numbers lie."""
    import json

    if mode == "--doctor":
        answer: dict = {"checks": [{"check": f"fuse {NASTY}", "ok": True, "detail": NASTY}]}
    else:
        answer = {"path": NASTY, "objects": NASTY, "bytes": 1, "cap": 2, "hit_rate": 0.5}
        answer |= {"hits": NASTY, "misses": 0, "bytes_saved": 0, "freed": 0}
    print(json.dumps(answer))


def _probe() -> None:
    """``setup``'s and ``doctor``'s probe of the host (a shell script on stdin): lies too."""
    import json

    sys.stdin.read()
    print(json.dumps({"python": NASTY, "venv": NASTY, "ready": {}, "others": [NASTY]}))


if __name__ == "__main__":
    remote_command = " ".join(sys.argv[1:])  # what ssh would run on the host
    if "sh -s" in remote_command:
        _probe()
        sys.exit(0)
    for mode in ("--doctor", "--cache-stats"):
        if mode in remote_command:
            _one_shot(mode)
            sys.exit(0)
    sys.exit(trio.run(_serve_stdio))
