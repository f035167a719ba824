"""The local control socket of a long-lived session, and what travels over it.

``topyaz-mount mount`` listens on ``<runtime dir>/<name>.sock`` (runtime.py), and
``exec --session``, ``shell``, ``status`` and ``unmount`` talk to it.

Messages are msgspec Structs in the same length-prefixed msgpack framing as the wire
to the agent, but a separate set: this socket is local and speaks for the user, so it
carries commands as the user typed them; the session translates them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Union

import msgspec

from .osapi import OS
from .runtime import ControlError as ControlError  # raised here, named by callers as ours
from .runtime import checked_socket, unreachable

if TYPE_CHECKING:  # trio is imported where it is used: `exec` through a session needs none
    import trio

MAX_MESSAGE = 8 << 20
_LEN = struct.Struct(">I")


class _Msg(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


# --- from the command-line client to the session ---------------------------------------


class Exec(_Msg):
    """Run a command. ``tty`` is (rows, cols) for a terminal session (``shell``);
    ``progress``: send the command's ``Figures`` this often (seconds; 0: never)."""

    argv: list[str]
    cwd: str
    env: dict[str, str] = {}
    stdin: bool = False
    literal: list[str] = []
    tty: list[int] | None = None
    includes: list[str] = []  # absolute local paths the manifest adds (--include)
    progress: float = 0.0


class StdinData(_Msg):
    data: bytes


class StdinClose(_Msg):
    pass


class SignalJob(_Msg):
    signum: int


class Resize(_Msg):
    rows: int
    cols: int


class Query(_Msg):
    pass


class Unmount(_Msg):
    force: bool = False


# --- from the session to the client ----------------------------------------------------


class Output(_Msg):
    fd: int
    data: bytes


class Note(_Msg):
    """A line for the user's stderr (a warning, or what an unmount is waiting for)."""

    text: str


class Figures(_Msg):
    """The command's transfer so far (``progress.Progress`` as a dict); the last one,
    phase "done", comes just before ``Finished`` and matches its stats."""

    figures: dict[str, int | float | str | None]


class Finished(_Msg):
    code: int
    lost: list[str] = []
    stats: dict[str, int | float | str] = {}
    refused: list[str] = []  # the write policy's summary lines (see policy.summarize)


class Failed(_Msg):
    """The session could not run the request: one line, and the status to exit with."""

    message: str
    exit_code: int
    ending: bool = False  # the session is ending: a one-shot exec starts its own instead


class Info(_Msg):
    info: dict[str, str | int | float]


class Unmounted(_Msg):
    kept_files: int = 0
    kept_bytes: int = 0
    kept_dir: str = ""


Message = Union[
    Exec,
    StdinData,
    StdinClose,
    SignalJob,
    Resize,
    Query,
    Unmount,
    Output,
    Note,
    Figures,
    Finished,
    Failed,
    Info,
    Unmounted,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def frame(msg: Message) -> bytes:
    """One message as it travels: its length, then its msgpack."""
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def take(buf: bytearray) -> Message | None:
    """The first whole message in ``buf`` (removed from it), or None for more bytes."""
    if len(buf) < 4:
        return None
    (size,) = _LEN.unpack_from(buf)
    if size > MAX_MESSAGE:
        raise ControlError(f"control message of {size} bytes refused")
    if len(buf) < 4 + size:
        return None
    body = bytes(buf[4 : 4 + size])
    del buf[: 4 + size]
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ControlError(f"malformed control message: {e}") from None


class Channel:
    """Messages over a connected stream: ``send`` and ``receive`` (None at the end)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        import trio

        self.stream = stream
        self._buf = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, msg: Message) -> None:
        async with self._send_lock:
            await self.stream.send_all(frame(msg))

    async def receive(self) -> Message | None:
        import trio

        while True:
            msg = take(self._buf)
            if msg is not None:
                return msg
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._buf += data

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def connect(name: str) -> Channel:
    """A channel to session ``name``; a clear error if there is none."""
    import trio

    path = checked_socket(name)
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as e:
        raise unreachable(name, e) from None
    return Channel(stream)


async def alive(name: str) -> bool:
    try:
        channel = await connect(name)
    except ControlError:
        return False
    await channel.aclose()
    return True


def peer_is_us(stream: trio.abc.Stream) -> bool:
    """Whether the process at the other end of a unix socket runs as this user."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return False
    return OS.peer_uid(sock) == os.getuid()


async def listen(path: Path) -> trio.SocketListener:
    """A listening socket at ``path`` that only this user can connect to."""
    import trio

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)  # never a moment with a wider mode
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(32)
    return trio.SocketListener(sock)
