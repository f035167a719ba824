"""The wire between client and agent: messages and framing, with no I/O (sans-IO).

Every frame is a 4-byte big-endian length followed by one msgpack-encoded message.
Messages are frozen, tagged msgspec Structs, so decoding validates every field's type;
either peer may be hostile, so sizes are capped before anything is buffered.

Paths on the wire are root-relative ``bytes`` (``b""`` is the root): Linux file names
are bytes, and pyfuse3 hands us bytes, so nothing is decoded on the way.
"""

from __future__ import annotations

import struct
from typing import Union

import msgspec

PROTOCOL_VERSION = 4
# A Run sent behind the Hello, before the Welcome named the mountpoint, carries its
# paths under this prefix, which the agent replaces by the mountpoint. Its NUL bytes
# cannot be in any argument, working directory or environment value of a real command.
ROOT_MARKER = "/\0topyaz-mount-root\0"
# Bytes the agent writes before its first frame, so that anything a remote shell's
# start-up files print on stdout can be skipped instead of breaking the framing.
MAGIC = b"\x00TOPYAZ-MOUNT-AGENT\x00"
CHUNK_SIZE = 1 << 20
MAX_FRAME = 8 << 20
_LEN = struct.Struct(">I")

# Priorities for outgoing frames: on-demand work jumps ahead of bulk transfers.
PRIO_URGENT = 0
PRIO_NORMAL = 1
PRIO_BULK = 2


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class _Msg(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


class Attr(msgspec.Struct, frozen=True, array_like=True):
    """What the agent needs of a client-side ``lstat``."""

    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int


class KnownDir(msgspec.Struct, frozen=True, array_like=True):
    """A directory's attributes as a Stat of it would answer (``Run.dirs``)."""

    path: bytes
    attr: Attr


class DirEntry(msgspec.Struct, frozen=True, array_like=True):
    """``blake3``: a regular file's content hash when the client knows it, so the
    agent's store can serve the file without asking. ``data``: the whole content of a
    small file the client had not hashed before (the store cannot have it then), so
    the job's open of it costs no round trip (fileserver.INLINE_FILE_MAX)."""

    name: bytes
    attr: Attr
    blake3: bytes | None = None
    data: bytes | None = None


# --- requests the client answers (agent -> client) ------------------------------------


class Stat(_Msg):
    path: bytes


class ListDir(_Msg):
    """``inline``: how many bytes of small files' content the listing may carry (the
    client caps it; see DirEntry.data). 0 for a listing that only answers lookups."""

    path: bytes
    inline: int = 0


class OpenRead(_Msg):
    path: bytes


class ReadChunk(_Msg):
    handle: int
    offset: int
    length: int


class CloseRead(_Msg):
    handle: int


class Mkdir(_Msg):
    path: bytes
    mode: int


class Rmdir(_Msg):
    path: bytes


class Unlink(_Msg):
    path: bytes


class Rename(_Msg):
    old: bytes
    new: bytes
    noreplace: bool = False


class SetAttr(_Msg):
    path: bytes
    mode: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class StatFs(_Msg):
    pass


class ReadLink(_Msg):
    path: bytes


class Symlink(_Msg):
    path: bytes
    target: bytes


class CommitBegin(_Msg):
    """Start writing an output: the client opens a temporary file beside ``path``.

    ``expect`` is the destination as the agent last saw it (``None``: it did not exist);
    ``check`` says whether a destination changed since then is a conflict.
    """

    commit: int
    path: bytes
    mode: int
    expect: Attr | None = None
    check: bool = False


class CommitEnd(_Msg):
    """All data sent; the client verifies size and hash, fsyncs and renames into place.

    ``path`` is where the output lands: where the file is now, which differs from the
    begin's path if the job renamed its directory meanwhile (``None``: the begin's).
    """

    commit: int
    size: int
    blake3: bytes
    mtime_ns: int | None = None
    path: bytes | None = None


class CommitAbort(_Msg):
    commit: int


# --- requests the agent answers (client -> agent) -------------------------------------


class PolicyRules(msgspec.Struct, frozen=True, array_like=True):
    """The client's write policy (policy.py), so an honest agent refuses a protected
    create at ``open`` instead of at commit. The client enforces it either way."""

    protect: list[str]
    hide: list[str]
    read_only: bool = False


class Hello(_Msg):
    """``root``: the client's root directory, recorded with outputs kept on the remote
    (``kept/``) so ``kept --recover`` knows where they belong."""

    version: int
    session_id: str
    capabilities: list[str] = []
    policy: PolicyRules | None = None
    root: str = ""
    bwlimit: int = 0  # bytes a second the agent may send (--bwlimit's DOWN); 0: no limit


class Run(_Msg):
    """Start a command. ``job`` is the client's id for it, carried by every notice
    about it; ``tty`` asks for a pseudo-terminal of (rows, cols) instead of pipes."""

    job: int
    argv: list[str]
    cwd: str
    env: dict[str, str] = {}
    stdin: bool = False
    tty: list[int] | None = None
    # A Manifest for this job was sent with it: the job starts once that is in.
    after_manifest: bool = False
    # The session ends with this job (a one-shot exec): after its Exited the agent
    # tears down and sends Closed unasked, a round trip before a Bye could.
    close_after: bool = False
    # The directories from the root down to ``cwd``, as a Stat of each would answer
    # (root-relative paths, b"" the root): the job's chdir then asks the client nothing.
    dirs: list[KnownDir] = []


class Bye(_Msg):
    """End the session. ``force``: do not wait for outputs still to be committed."""

    force: bool = False


class ManifestEntry(msgspec.Struct, frozen=True, array_like=True):
    path: bytes
    size: int
    mtime_ns: int
    blake3: bytes | None = None


class Manifest(_Msg):
    """The inputs job ``job`` will read, in the order it will read them."""

    job: int
    entries: list[ManifestEntry]


class Status(_Msg):
    """What the session has done so far (for ``topyaz-mount status``)."""


class RecoverKept(_Msg):
    """Commit home the complete outputs kept on the remote for this session's root."""


class Reattach(_Msg):
    """A new client process takes over a detached session (``topyaz-mount attach``).

    ``offsets``: [job, fd, bytes] of each job's output the old client wrote out; the
    agent sends the rest again from its bounded buffer, then every job's ``Exited``
    it has. Sent instead of ``Hello``."""

    offsets: list[list[int]]


# --- replies --------------------------------------------------------------------------


class Done(_Msg):
    pass


class AttrReply(_Msg):
    attr: Attr


class Listing(_Msg):
    entries: list[DirEntry]


class Opened(_Msg):
    """A read handle; ``blake3`` is the content hash when the client knows it."""

    handle: int
    attr: Attr
    blake3: bytes | None = None


class Data(_Msg):
    data: bytes


class FsStats(_Msg):
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int


class LinkTarget(_Msg):
    target: bytes


class Reattached(_Msg):
    """The session's jobs (running, or ended with their ``Exited`` sent again) and
    where the root is mounted."""

    jobs: list[int]
    mountpoint: str


class Committed(_Msg):
    """Where the output landed (``path`` differs from the request on a conflict)."""

    path: bytes
    attr: Attr


class Welcome(_Msg):
    """``backend``: how the job sees the root ("fuse" or "stage"); ``backend_note``:
    why ``auto`` did not mount (empty when it did)."""

    version: int
    session_id: str
    mountpoint: str
    agent_pid: int
    capabilities: list[str] = []
    backend: str = ""
    backend_note: str = ""


class Started(_Msg):
    pid: int


class Missing(_Msg):
    """Indices of manifest entries whose content the remote cache lacks."""

    indices: list[int]


class Closed(_Msg):
    """The session is torn down; outputs not committed were kept on the remote."""

    kept_files: int = 0
    kept_bytes: int = 0
    kept_dir: str = ""


class Closing(_Msg):
    """The session tore down after the Exited of a Run with ``close_after``: its
    Closed, sent unasked instead of as the answer to a Bye."""

    closed: Closed


class Recovered(_Msg):
    """What ``RecoverKept`` did: root-relative paths committed (``saved_as`` differs
    where the local file had changed: the output went beside it), and what failed."""

    committed: list[bytes]
    saved_as: list[bytes]
    failed: list[str]
    partial_left: int


class StatusReply(_Msg):
    """Counters since the session began, and the work not finished yet."""

    stats: dict[str, int]
    jobs: int
    pending_outputs: int
    pending_bytes: int
    backend: str = ""


# --- notifications (no reply) ---------------------------------------------------------


class CommitChunk(_Msg):
    commit: int
    offset: int
    data: bytes


class Output(_Msg):
    """Bytes job ``job`` wrote to its stdout (fd 1) or stderr (fd 2)."""

    job: int
    fd: int
    data: bytes


class Refused(msgspec.Struct, frozen=True, array_like=True):
    """A change the agent refused by the client's policy: path, what was tried, why."""

    path: bytes
    op: str
    why: str


class Exited(_Msg):
    """The job ended and every output it wrote is committed (or listed in ``lost``)."""

    job: int
    code: int
    lost: list[str] = []
    stats: dict[str, int] = {}
    refused: list[Refused] = []


class StdinData(_Msg):
    job: int
    data: bytes


class StdinClose(_Msg):
    job: int


class Signal(_Msg):
    job: int
    signum: int


class Resize(_Msg):
    """The client's terminal changed size: the job's pseudo-terminal follows."""

    job: int
    rows: int
    cols: int


class Invalidate(_Msg):
    """These root-relative paths changed on the client: forget what is cached of them."""

    paths: list[bytes]


class Hashed(_Msg):
    """The client finished hashing an input it began streaming unhashed."""

    handle: int
    blake3: bytes


class Ping(_Msg):
    """A keepalive (liveness.py): the sender is there. Either side sends it."""


class Log(_Msg):
    """A line for the user about job ``job`` (0: the session), e.g. an output conflict."""

    level: str
    text: str
    job: int = 0


Request = Union[
    Stat,
    ListDir,
    OpenRead,
    ReadChunk,
    CloseRead,
    Mkdir,
    Rmdir,
    Unlink,
    Rename,
    SetAttr,
    StatFs,
    ReadLink,
    Symlink,
    CommitBegin,
    CommitEnd,
    CommitAbort,
    Hello,
    Run,
    Bye,
    Manifest,
    Status,
    RecoverKept,
    Reattach,
]
Response = Union[
    Done,
    AttrReply,
    Listing,
    Opened,
    Data,
    FsStats,
    LinkTarget,
    Committed,
    Welcome,
    Started,
    Missing,
    StatusReply,
    Closed,
    Recovered,
    Reattached,
]
Notice = Union[
    CommitChunk,
    Output,
    Exited,
    StdinData,
    StdinClose,
    Signal,
    Resize,
    Invalidate,
    Log,
    Hashed,
    Ping,
    Closing,
]


class Call(_Msg):
    rid: int
    prio: int
    req: Request


class Reply(_Msg):
    rid: int
    res: Response


class Fail(_Msg):
    """A request failed; ``errno`` crosses as data and becomes an OSError or FUSEError."""

    rid: int
    errno: int
    message: str


class Notify(_Msg):
    msg: Notice


Frame = Union[Call, Reply, Fail, Notify]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode(frame: Frame) -> bytearray:
    """One frame, length prefix included: encoded behind room for the prefix, so a
    megabyte of chunk data is not copied once more to put four bytes in front."""
    out = bytearray(_LEN.size)
    _encoder.encode_into(frame, out, _LEN.size)
    size = len(out) - _LEN.size
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte cap")
    _LEN.pack_into(out, 0, size)
    return out


class FrameDecoder:
    """Turns a byte stream into frames: ``feed(data)`` then iterate ``frames()``."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        return [frame for frame, _ in self.sized_frames()]

    def sized_frames(self) -> list[tuple[Frame, int]]:
        """The complete frames buffered, each with its size on the wire."""
        out: list[tuple[Frame, int]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > self._max:
                raise ProtocolError(f"peer announced a {size}-byte frame (cap {self._max})")
            if len(buf) - pos - 4 < size:
                break
            body = memoryview(buf)[pos + 4 : pos + 4 + size]
            try:
                out.append((_decoder.decode(body), 4 + size))
            except msgspec.DecodeError as e:
                raise ProtocolError(f"malformed frame: {e}") from None
            finally:
                body.release()
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def strip_preamble(buf: bytearray, limit: int = 1 << 16) -> tuple[bool, bytes]:
    """Drop bytes up to and including MAGIC; returns (found, skipped bytes).

    Whatever a login shell printed before the agent started is returned so it can be
    logged. Past ``limit`` bytes without MAGIC the peer is not our agent.
    """
    i = buf.find(MAGIC)
    if i < 0:
        # The last len(MAGIC)-1 bytes may be the start of a MAGIC still arriving.
        if len(buf) - (len(MAGIC) - 1) > limit:
            raise ProtocolError("the remote side never started a topyaz-mount agent")
        return False, b""
    skipped = bytes(buf[:i])
    del buf[: i + len(MAGIC)]
    return True, skipped
