"""proto.py: frames round-trip, and anything malformed is a ProtocolError (nothing else)."""

from __future__ import annotations

import struct
import types
import typing

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from topyaz_mount.wire import proto

FAST = settings(
    database=None, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)

# --- strategies built from the message definitions themselves ------------------------
# (so a message type added to proto.py is covered without touching this file)

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SMALL_BYTES = st.binary(max_size=64)
TEXT = st.text(max_size=24)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)


def strategy_for(tp) -> st.SearchStrategy:
    if tp is int:
        return INT64
    if tp is bool:
        return st.booleans()
    if tp is bytes:
        return SMALL_BYTES
    if tp is str:
        return TEXT
    if tp is type(None):
        return st.none()
    if _is_union(tp):
        return st.one_of([strategy_for(a) for a in typing.get_args(tp)])
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(strategy_for(item), max_size=4)
    if origin is dict:
        key, value = typing.get_args(tp)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=4)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    raise NotImplementedError(f"no strategy for {tp!r}")


def struct_strategy(cls: type) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = msgspec.structs.fields(cls)
    return st.builds(
        cls, **{f.name: st.deferred(lambda t=hints[f.name]: strategy_for(t)) for f in fields}
    )


def _union_members(u) -> list[type]:
    return list(typing.get_args(u))


REQUESTS = _union_members(proto.Request)
RESPONSES = _union_members(proto.Response)
NOTICES = _union_members(proto.Notice)
FRAME_TYPES = _union_members(proto.Frame)
ALL_MESSAGES = REQUESTS + RESPONSES + NOTICES

frames = strategy_for(proto.Frame)


def every_frame_of(cls: type) -> st.SearchStrategy:
    """Frames wrapping a message of type ``cls`` (or ``cls`` itself for Fail)."""
    body = struct_strategy(cls)
    if cls in REQUESTS:
        return st.builds(proto.Call, INT64, INT64, body)
    if cls in RESPONSES:
        return st.builds(proto.Reply, INT64, body)
    return st.builds(proto.Notify, body)


def decode_all(data: bytes, pieces: list[int] | None = None) -> list:
    dec = proto.FrameDecoder()
    out = []
    if pieces is None:
        dec.feed(data)
        out += dec.frames()
    else:
        pos = 0
        for n in pieces:
            dec.feed(data[pos : pos + n])
            out += dec.frames()
            pos += n
        dec.feed(data[pos:])
        out += dec.frames()
    assert dec.buffered == 0
    return out


# --- coverage of the message set -----------------------------------------------------


def test_every_message_type_belongs_to_exactly_one_union():
    declared = {
        c
        for c in vars(proto).values()
        if isinstance(c, type) and issubclass(c, proto._Msg) and c is not proto._Msg
    }
    in_unions = set(ALL_MESSAGES) | set(FRAME_TYPES)
    assert declared == in_unions
    assert len(ALL_MESSAGES) == len(set(ALL_MESSAGES))


def test_tags_are_unique():
    tags = [msgspec.inspect.type_info(c).tag for c in ALL_MESSAGES + FRAME_TYPES]
    assert len(tags) == len(set(tags))


@pytest.mark.parametrize("cls", ALL_MESSAGES + [proto.Fail], ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_round_trip_each_message_type(cls, data):
    frame = data.draw(every_frame_of(cls) if cls is not proto.Fail else struct_strategy(cls))
    encoded = proto.encode(frame)
    assert struct.unpack(">I", encoded[:4])[0] == len(encoded) - 4
    assert decode_all(encoded) == [frame]
    (back,) = decode_all(encoded)
    assert type(back) is type(frame)


@settings(database=None, deadline=None, max_examples=40)
@given(st.lists(frames, min_size=1, max_size=3))
def test_round_trip_fed_byte_by_byte(fs):
    data = b"".join(proto.encode(f) for f in fs)
    assume(len(data) < 2000)
    assert decode_all(data, [1] * len(data)) == fs


@FAST
@given(st.lists(frames, min_size=1, max_size=6), st.data())
def test_round_trip_random_splits(fs, data):
    blob = b"".join(proto.encode(f) for f in fs)
    pieces = data.draw(st.lists(st.integers(0, len(blob)), max_size=12))
    assert decode_all(blob, pieces) == fs
    assert decode_all(blob) == fs


def test_partial_frame_stays_buffered():
    enc = proto.encode(proto.Notify(proto.Output(1, 1, b"hello")))
    dec = proto.FrameDecoder()
    dec.feed(enc[:-1])
    assert dec.frames() == []
    assert dec.buffered == len(enc) - 1
    dec.feed(enc[-1:])
    assert dec.frames() == [proto.Notify(proto.Output(1, 1, b"hello"))]
    assert dec.buffered == 0


def test_frames_after_a_complete_one_wait_for_their_bytes():
    a = proto.encode(proto.Reply(1, proto.Done()))
    b = proto.encode(proto.Fail(2, 2, "ENOENT"))
    dec = proto.FrameDecoder()
    dec.feed(a + b[:3])
    assert dec.frames() == [proto.Reply(1, proto.Done())]
    assert dec.buffered == 3
    dec.feed(b[3:])
    assert dec.frames() == [proto.Fail(2, 2, "ENOENT")]


# --- caps ----------------------------------------------------------------------------


def _overhead() -> int:
    """Body bytes of a Notify(Output) besides its payload, for payloads >= 64 KiB."""
    n = 1 << 17
    return len(msgspec.msgpack.encode(proto.Notify(proto.Output(1, 1, b"x" * n)))) - n


def test_largest_frame_passes_and_one_more_byte_is_refused():
    n = proto.MAX_FRAME - _overhead()
    frame = proto.Notify(proto.Output(1, 1, b"x" * n))
    enc = proto.encode(frame)
    assert len(enc) == 4 + proto.MAX_FRAME
    assert decode_all(enc) == [frame]
    with pytest.raises(proto.ProtocolError):
        proto.encode(proto.Notify(proto.Output(1, 1, b"x" * (n + 1))))


def test_oversize_announcement_is_refused_before_the_body_arrives():
    dec = proto.FrameDecoder()
    dec.feed(struct.pack(">I", proto.MAX_FRAME + 1))
    with pytest.raises(proto.ProtocolError):
        dec.frames()


def test_custom_cap():
    enc = proto.encode(proto.Notify(proto.Output(1, 1, b"y" * 200)))
    dec = proto.FrameDecoder(max_frame=100)
    dec.feed(enc)
    with pytest.raises(proto.ProtocolError):
        dec.frames()
    ok = proto.FrameDecoder(max_frame=len(enc) - 4)
    ok.feed(enc)
    assert len(ok.frames()) == 1


# --- malformed input -----------------------------------------------------------------


def _body(obj) -> bytes:
    b = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(b)) + b


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", 0),  # empty body
        _body(["Nope", 1]),  # unknown tag
        _body(["Stat", b"x"]),  # a bare request, not a frame
        _body(proto.Call(1, 1, proto.Done())),  # a reply where a request belongs
        _body(proto.Reply(1, proto.Stat(b"x"))),  # a request where a reply belongs
        _body(proto.Notify(proto.Stat(b"x"))),  # a request as a notice
        _body(["Call", 1, 1, ["Stat", "not-bytes"]]),  # wrong field type
        _body(["Call", "1", 1, ["Stat", b"x"]]),  # wrong rid type
        _body(["Call", 1, 1]),  # missing field
        _body(["Reply", 1, ["AttrReply", [1, 2, 3]]]),  # short Attr
        _body(["Call", 1, 1, ["ReadChunk", 1, 1.5, 3]]),  # float where an int belongs
        struct.pack(">I", 10) + b"\xcf" + b"\xff" * 8 + b"\xc0",  # trailing bytes in the body
        _body({"rid": 1}),  # map instead of array
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # never-used msgpack byte
        struct.pack(">I", 2) + b"\x92\xa4",  # truncated inside the body
    ],
)
def test_malformed_frames_raise_protocol_error(data):
    dec = proto.FrameDecoder()
    dec.feed(data)
    with pytest.raises(proto.ProtocolError):
        dec.frames()


def _only_protocol_errors(chunks: list[bytes], max_frame: int = 1 << 16) -> None:
    dec = proto.FrameDecoder(max_frame=max_frame)
    for chunk in chunks:
        dec.feed(chunk)
        try:
            dec.frames()
        except proto.ProtocolError:
            return
        # any other exception type fails the test


@settings(database=None, deadline=None, max_examples=200)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_random_bytes(chunks):
    _only_protocol_errors(chunks)


@settings(database=None, deadline=None, max_examples=200)
@given(st.binary(max_size=300))
def test_fuzz_well_framed_random_bodies(body):
    _only_protocol_errors([struct.pack(">I", len(body)) + body])


@settings(database=None, deadline=None, max_examples=300)
@given(frames, st.data())
def test_fuzz_mutated_valid_frames(frame, data):
    enc = bytearray(proto.encode(frame))
    edits = data.draw(
        st.lists(
            st.tuples(st.integers(4, len(enc) - 1), st.integers(0, 255)), min_size=1, max_size=4
        )
    )
    for pos, value in edits:
        enc[pos] = value
    cut = data.draw(st.integers(4, len(enc)))
    # keep the length prefix consistent with what follows, so the body is parsed
    body = bytes(enc[4:cut])
    _only_protocol_errors([struct.pack(">I", len(body)) + body])


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.binary(max_size=8) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
# values shaped like frames: a known tag first, then anything
FRAME_SHAPED = st.builds(
    lambda tag, rest: [tag, *rest],
    st.sampled_from([msgspec.inspect.type_info(c).tag for c in ALL_MESSAGES + FRAME_TYPES]),
    st.lists(MSGPACK_VALUES, max_size=5),
)


@settings(database=None, deadline=None, max_examples=150)
@given(MSGPACK_VALUES | FRAME_SHAPED)
def test_fuzz_arbitrary_msgpack_values(value):
    _only_protocol_errors([_body(value)])


def test_deep_nesting_is_a_protocol_error():
    depth = 100_000
    body = b"\x91" * depth + b"\xc0"  # [[[[...None...]]]]
    _only_protocol_errors([struct.pack(">I", len(body)) + body], proto.MAX_FRAME)
    body = b"\x94\xa4Call\x01\x01" + b"\x91" * depth + b"\xc0"
    _only_protocol_errors([struct.pack(">I", len(body)) + body], proto.MAX_FRAME)


# --- preamble ------------------------------------------------------------------------


def test_strip_preamble_skips_junk_and_keeps_what_follows():
    first = proto.encode(proto.Reply(1, proto.Done()))
    buf = bytearray(b"Welcome to gpu-box\nlast login: never\n" + proto.MAGIC + first)
    found, skipped = proto.strip_preamble(buf)
    assert found
    assert skipped == b"Welcome to gpu-box\nlast login: never\n"
    assert bytes(buf) == first


def test_strip_preamble_without_junk():
    buf = bytearray(proto.MAGIC)
    assert proto.strip_preamble(buf) == (True, b"")
    assert buf == bytearray()


def test_strip_preamble_waits_for_more_bytes():
    buf = bytearray(b"motd " + proto.MAGIC[:5])
    assert proto.strip_preamble(buf) == (False, b"")
    assert bytes(buf) == b"motd " + proto.MAGIC[:5]  # untouched until MAGIC is whole
    buf += proto.MAGIC[5:] + b"rest"
    assert proto.strip_preamble(buf) == (True, b"motd ")
    assert bytes(buf) == b"rest"


def test_strip_preamble_limit():
    buf = bytearray(b"x" * 100)
    assert proto.strip_preamble(buf, limit=100) == (False, b"")
    assert len(buf) == 100
    buf += b"y" * len(proto.MAGIC)  # now past the limit, even allowing for a partial MAGIC
    with pytest.raises(proto.ProtocolError):
        proto.strip_preamble(buf, limit=100)


def test_strip_preamble_finds_magic_after_a_long_preamble_in_one_piece():
    junk = b"z" * 500
    buf = bytearray(junk + proto.MAGIC + b"tail")
    assert proto.strip_preamble(buf, limit=100) == (True, junk)
    assert bytes(buf) == b"tail"


def test_strip_preamble_default_limit():
    with pytest.raises(proto.ProtocolError):
        proto.strip_preamble(bytearray(b"\n" * ((1 << 16) + len(proto.MAGIC))))


def test_strip_preamble_only_first_magic_is_consumed():
    buf = bytearray(b"j" + proto.MAGIC + proto.MAGIC)
    assert proto.strip_preamble(buf) == (True, b"j")
    assert bytes(buf) == proto.MAGIC


@settings(database=None, deadline=None, max_examples=200)
@given(st.binary(max_size=300), st.binary(max_size=50), st.data())
def test_strip_preamble_fed_in_pieces(junk, after, data):
    assume(proto.MAGIC not in junk + proto.MAGIC[:-1])
    stream = junk + proto.MAGIC + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buf = bytearray()
    pos = 0
    result = (False, b"")
    for cut in [*cuts, len(stream)]:
        buf += stream[pos:cut]
        pos = max(pos, cut)
        result = proto.strip_preamble(buf, limit=len(junk))
        if result[0]:
            break
    assert result == (True, junk)
    assert bytes(buf) + stream[pos:] == after


def test_strip_preamble_limit_does_not_depend_on_chunking():
    """Junk of exactly ``limit`` bytes is accepted however MAGIC is split (fixed in 2b68c3c)."""
    limit = 100
    junk = b"x" * limit  # allowed: not *past* the limit
    whole = bytearray(junk + proto.MAGIC)
    assert proto.strip_preamble(whole, limit=limit) == (True, junk)
    # the same bytes, with MAGIC arriving in two pieces
    buf = bytearray(junk + proto.MAGIC[:4])
    assert proto.strip_preamble(buf, limit=limit) == (False, b"")
    buf += proto.MAGIC[4:]
    assert proto.strip_preamble(buf, limit=limit) == (True, junk)
