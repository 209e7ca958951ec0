"""Framing and safe CBOR decoding (txrpc/_codec.py), and what a server-side Connection
does with hostile bytes: round-trips of any CBOR-able value, fuzzing with random and
mutated frames, and the explicit attacks the decoder must refuse."""

from __future__ import annotations

import math
import time
from typing import Any

import cbor2
import pytest
from _wire_helpers import (
    CLIENT_HELLO,
    colliding_int_keys_map,
    count_leaves,
    head,
    msg,
    nested_arrays,
    raw_frame,
    same_value,
    shared_reference_bomb,
    stringref_bomb,
    text,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txrpc import Code, Limits
from txrpc._codec import (
    FRAME_BYTES_LIMIT,
    LARGE_BYTES_MIN,
    FrameDecoder,
    FrameError,
    ValueDecoder,
    canonical,
    decode_value,
    encode_frame,
    encode_value,
    frame,
    has_large_bytes,
)
from txrpc._connection import (
    Call,
    CallRefused,
    Connection,
    GoAway,
    Hello,
    Ping,
    RemoteProtocolError,
    Role,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)  # surrogates are not UTF-8
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)  # bignums (tags 2/3)
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**64), -(2**64) - 1])  # width edges
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
    | st.binary(max_size=20)
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


cbor_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(texts, children, max_size=6),
    max_leaves=40,
).filter(lambda v: depth(v) < 64)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the (sorted, deduplicated) positions in ``cuts``."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [p for p in pieces if p]


# --- round trips ----------------------------------------------------------------------


@FUZZ
@given(
    values=st.lists(cbor_values, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10**6), max_size=12)
)
def test_values_round_trip_through_frames_in_any_chunking(values: list[Any], cuts: list[int]) -> None:
    stream = b"".join(frame(encode_value(v)) for v in values)
    decoder = FrameDecoder(1 << 20)
    bodies: list[bytes] = []
    for piece in chunked(stream, cuts):
        bodies.extend(decoder.feed(piece))
    assert decoder.buffered_bytes == 0
    decoded = [decode_value(body) for body in bodies]
    assert len(decoded) == len(values)
    for original, copy in zip(values, decoded, strict=True):
        assert same_value(original, copy), (original, copy)


large_bytes = st.builds(
    lambda size, fill: bytes([fill]) * size,
    st.sampled_from([LARGE_BYTES_MIN, LARGE_BYTES_MIN + 1, 65_791, 1 << 20, (1 << 24) - 1, 1 << 24]),
    st.integers(0, 255),
)
top_level_values = (
    cbor_values | large_bytes | st.lists(cbor_values | large_bytes, max_size=4) | st.tuples(large_bytes, cbor_values)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(message=st.dictionaries(texts, top_level_values, max_size=5), cuts=st.lists(st.integers(0, 1 << 25), max_size=6))
def test_large_byte_strings_are_framed_exactly_as_cbor2_would(message: dict[str, Any], cuts: list[int]) -> None:
    """The large-value path (byte strings copied once, not through cbor2) writes the
    very bytes ``frame(encode_value(...))`` writes, and they decode to the message in
    any chunking."""
    large = any(has_large_bytes(v) for v in message.values())
    data, length = encode_frame(message, large)
    assert data == frame(encode_value(message))
    assert length == len(data) - 4
    decoder = FrameDecoder(FRAME_BYTES_LIMIT)
    bodies = [body for piece in chunked(data, cuts) for body in decoder.feed(piece)]
    assert len(bodies) == 1 and decoder.buffered_bytes == 0
    decoded = decode_value(bodies[0])
    assert same_value({k: list(v) if type(v) is tuple else v for k, v in message.items()}, decoded)


def test_a_frame_dribbled_byte_by_byte_is_buffered_compactly() -> None:
    """Small pieces of a pending frame are copied into one buffer (not kept as one view
    each), large ones are kept as views; either way the body comes out whole, once."""
    body = encode_value(b"y" * 200_000)
    data = frame(body)
    decoder = FrameDecoder(1 << 20)
    for i in range(50_000):
        assert decoder.feed(data[i : i + 1]) == []
    assert len(decoder._parts) == 1 and decoder.buffered_bytes == 50_000
    assert decoder.bytes_wanted == len(body) - (50_000 - 4)
    assert decoder.feed(data[50_000:150_000]) == []  # large: kept as a view
    assert len(decoder._parts) == 2
    assert decoder.feed(data[150_000:]) == [body]
    assert decoder.buffered_bytes == 0 and decoder.bytes_wanted == 0


def full_path(body: bytes, depth_max: int = 64) -> Any:
    """decode_value through cbor2 alone (a memoryview never takes the large-message path)."""
    return decode_value(memoryview(body), depth_max)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "value", fn(*args)
    except FrameError:
        return "error", None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    message=st.dictionaries(texts, top_level_values, min_size=1, max_size=5),
    damage=st.lists(st.tuples(st.integers(0, 1 << 25), st.integers(0, 255)), max_size=3),
    cut=st.none() | st.integers(0, 1 << 25),
)
def test_large_messages_decode_exactly_as_cbor2_decodes_them(
    message: dict[str, Any], damage: list[tuple[int, int]], cut: int | None
) -> None:
    """The large-message path agrees with cbor2 on every body: the same value for a
    good one, a FrameError for a damaged or truncated one that cbor2 refuses."""
    body = encode_value(message)
    assert same_value(decode_value(body), full_path(body))
    broken = bytearray(body)
    for position, byte in damage:
        broken[position % len(broken)] = byte
    if cut is not None:
        del broken[max(1, cut % len(broken)) :]
    fast, slow = outcome(decode_value, bytes(broken)), outcome(full_path, bytes(broken))
    assert fast[0] == slow[0] and (fast[0] == "error" or same_value(fast[1], slow[1])), (fast, slow)


def test_large_message_edge_cases_match_cbor2() -> None:
    big = b"z" * LARGE_BYTES_MIN
    cases = [
        encode_value({b"bytes key": big}),  # not text keys: cbor2 decodes the whole
        encode_value({"a": big, "n": nested(70)}),  # too deep inside
        encode_value({"a": [big, nested(62)]}),  # exactly deep enough inside an array
        encode_value({"a": [big, nested(63)]}),  # one too deep
        b"\xbf" + encode_value("a") + encode_value(big) + b"\xff",  # indefinite map
        b"\xa2" + encode_value("a") + encode_value(big) + encode_value("a") + b"\x00",  # duplicate key
        encode_value({"a": big}) + b"\x00",  # trailing byte
        b"\xa1" + encode_value("a") + b"\x5b" + (1 << 63).to_bytes(8, "big") + big,  # absurd length
    ]
    for body in cases:
        assert len(body) >= LARGE_BYTES_MIN
        fast, slow = outcome(decode_value, body), outcome(full_path, body)
        assert fast[0] == slow[0] and (fast[0] == "error" or same_value(fast[1], slow[1])), body[:16]


def nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def test_has_large_bytes_looks_at_the_top_level_only() -> None:
    big = b"x" * LARGE_BYTES_MIN
    assert has_large_bytes(big) and has_large_bytes([1, big]) and has_large_bytes((big,))
    assert not has_large_bytes(big[:-1]) and not has_large_bytes([[big]]) and not has_large_bytes({"k": big})
    assert not has_large_bytes(bytearray(big))  # only exact bytes take the fast path


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1.7976931348623157e308, 2**64, -(2**64) - 1, 10**300],
)
def test_special_numbers_round_trip_exactly(value: Any) -> None:
    assert same_value(decode_value(encode_value(value)), value)


def test_unencodable_values_raise_type_error() -> None:
    with pytest.raises(TypeError):
        encode_value(object())
    with pytest.raises(TypeError):
        encode_value({"a": [1, object()]})


def test_canonical_encoding_ignores_map_insertion_order() -> None:
    assert canonical({"b": 1, "a": [2, {"y": 0, "x": 1}]}) == canonical({"a": [2, {"x": 1, "y": 0}], "b": 1})
    assert canonical({"b": 1, "a": 2}) != encode_value({"b": 1, "a": 2})  # sorted, not as inserted


def test_many_frames_in_one_feed_and_a_partial_tail() -> None:
    decoder = FrameDecoder(1024)
    stream = b"".join(frame(encode_value(i)) for i in range(100)) + frame(encode_value("tail"))[:-2]
    bodies = decoder.feed(stream)
    assert [decode_value(b) for b in bodies] == list(range(100))
    assert decoder.buffered_bytes == len(frame(encode_value("tail"))) - 2
    assert [decode_value(b) for b in decoder.feed(frame(encode_value("tail"))[-2:])] == ["tail"]
    assert decoder.buffered_bytes == 0


# --- the length prefix --------------------------------------------------------------


def test_length_prefix_of_2_to_the_31_is_refused_at_once() -> None:
    decoder = FrameDecoder(FRAME_BYTES_LIMIT)
    with pytest.raises(FrameError, match="announced"):
        decoder.feed((2**31).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        FrameDecoder(16 << 20).feed(b"\xff\xff\xff\xff")


@pytest.mark.parametrize("announced", [1025, 1 << 20, 2**32 - 1])
def test_frames_over_frame_bytes_max_are_refused_before_the_body_arrives(announced: int) -> None:
    decoder = FrameDecoder(1024)
    prefix = announced.to_bytes(4, "big")
    assert decoder.feed(prefix[:3]) == []  # not yet a whole prefix: nothing to judge
    with pytest.raises(FrameError, match="frame_bytes_max is 1024"):
        decoder.feed(prefix[3:])  # no body byte has been sent


def test_a_frame_of_exactly_frame_bytes_max_is_accepted() -> None:
    decoder = FrameDecoder(1024)
    body = encode_value("x" * 1021)
    assert len(body) == 1024
    assert decoder.feed(frame(body)[:100]) == []
    assert decoder.feed(frame(body)[100:]) == [body]


def test_frame_decoder_bounds_its_own_limit() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(0)
    with pytest.raises(ValueError):
        FrameDecoder(2**31)


def test_zero_length_frame_is_refused() -> None:
    with pytest.raises(FrameError, match="empty"):
        FrameDecoder(1024).feed(b"\x00\x00\x00\x00")
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"\x00\x00\x00\x00")


# --- unsafe CBOR ----------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"\xd8\x1c\x80", b"\xd8\x1d\x00", b"\x82\xd8\x1c\x81\x00\xd8\x1d\x00"])
def test_shared_reference_tags_are_refused(body: bytes) -> None:
    assert cbor2.loads(b"\x82\xd8\x1c\x81\x00\xd8\x1d\x00") == [[0], [0]]  # cbor2 honours them by default
    with pytest.raises(FrameError, match="28/29"):
        decode_value(body)


def test_shared_reference_bomb_is_refused_quickly() -> None:
    small = shared_reference_bomb(12)
    assert count_leaves(cbor2.loads(small), 10**6) > 4000  # the hazard is real with defaults
    bomb = shared_reference_bomb(30)
    assert len(bomb) < 300  # ~2**31 leaves once expanded
    started = time.perf_counter()
    with pytest.raises(FrameError):
        decode_value(bomb)
    server = Connection(Role.SERVER)
    server.receive_data(msg(CLIENT_HELLO))
    server.send_hello()
    call_head = head(5, 4) + text("t") + b"\x01" + text("i") + b"\x01" + text("m") + text("echo") + text("a")
    with pytest.raises(RemoteProtocolError):
        server.receive_data(raw_frame(call_head + head(4, 1) + bomb))
    assert time.perf_counter() - started < 1.0


def test_string_reference_namespaces_are_refused() -> None:
    """Tags 256/25 (string references) share one decoded string among many positions:
    ~10 KB expands to ~8 MB when a handler echoes it back (the same amplification as
    tags 28/29)."""
    bomb = stringref_bomb(4096, 2000)
    assert len(cbor2.dumps(cbor2.loads(bomb))) > 500 * len(bomb)  # the hazard with defaults
    with pytest.raises(FrameError):
        decode_value(bomb)


def test_map_keys_that_can_collide_in_pythons_hash_are_refused() -> None:
    """Integers k * (2**61 - 1) all hash alike: building such a map is quadratic (a
    1 MiB frame would hold the event loop for about a minute and a half)."""
    flood = colliding_int_keys_map(20000)  # cbor2's defaults take seconds over it (~0.1 s at 4,000 keys)
    started = time.perf_counter()
    with pytest.raises(FrameError):
        decode_value(flood)
    assert time.perf_counter() - started < 0.5  # refused at the first key: well under 1 ms here
    with pytest.raises(FrameError):
        decode_value(cbor2.dumps(cbor2.CBORTag(258, [1, 2])))  # set elements hash the same way
    assert decode_value(cbor2.dumps({"a": 1, b"b": 2})) == {"a": 1, b"b": 2}  # text/bytes keys are fine


@pytest.mark.parametrize(
    "body",
    [
        b"\xa2\x61a\x01\x61a\x02",  # {"a": 1, "a": 2}
        b"\x81\xa2\x61x\x00\x61x\x00",  # nested, identical values
        b"\xbf\x61a\x01\x61a\x02\xff",  # indefinite-length map
        b"\xa2\x41a\x01\x41a\x02",  # byte-string keys
    ],
)
def test_duplicate_map_keys_are_refused(body: bytes) -> None:
    with pytest.raises(FrameError, match=r"[Dd]uplicate"):
        decode_value(body)


def test_a_message_with_a_duplicate_field_is_refused() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(msg(CLIENT_HELLO))
    server.send_hello()
    # {"t": 1, "i": 1, "m": "add", "a": [], "i": 2}: which id would the server answer?
    body = head(5, 5) + text("t") + b"\x01" + text("i") + b"\x01" + text("m") + text("add")
    body += text("a") + b"\x80" + text("i") + b"\x02"
    with pytest.raises(RemoteProtocolError, match=r"[Dd]uplicate"):
        server.receive_data(raw_frame(body))


def test_nesting_depth_is_bounded() -> None:
    assert decode_value(nested_arrays(64)) is not None  # the default cbor_depth_max is 64
    for body in (
        nested_arrays(65),
        b"\xa1\x61k" * 65 + b"\x00",
        b"\x9f" * 65 + b"\xff" * 65,
        nested_arrays(5000),
    ):
        with pytest.raises(FrameError, match="depth"):
            decode_value(body)
    with pytest.raises(FrameError):
        decode_value(nested_arrays(9), depth_max=8)
    assert decode_value(nested_arrays(8), depth_max=8) is not None


def test_connection_uses_cbor_depth_max() -> None:
    def call_nested(levels: int) -> bytes:
        args: Any = 0
        for _ in range(levels):
            args = [args]
        return msg({"t": 1, "i": 1, "m": "echo", "a": args})

    shallow = Connection(Role.SERVER, Limits(cbor_depth_max=8))
    shallow.receive_data(msg(CLIENT_HELLO))
    shallow.send_hello()
    assert isinstance(shallow.receive_data(call_nested(7))[0], Call)  # map + 7 arrays = depth 8
    with pytest.raises(RemoteProtocolError, match="depth"):
        shallow.receive_data(call_nested(8))


@pytest.mark.parametrize(
    "body", [b"\x01\x00", b"\x80\x80", b"\xa0\x61", encode_value({"t": 5, "n": 1}) + b"\xf6"]
)
def test_trailing_bytes_after_the_item_are_refused(body: bytes) -> None:
    with pytest.raises(FrameError, match="trailing"):
        decode_value(body)


def test_trailing_bytes_in_a_message_are_refused_by_the_connection() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(msg(CLIENT_HELLO))
    server.send_hello()
    with pytest.raises(RemoteProtocolError, match="trailing"):
        server.receive_data(raw_frame(encode_value({"t": 5, "n": 1}) + encode_value({"t": 5, "n": 2})))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x9f\x01\x02\xff", [1, 2]),
        (b"\xbf\x61a\x01\xff", {"a": 1}),
        (b"\x7f\x61a\x62bc\xff", "abc"),
        (b"\x5f\x41a\x42bc\xff", b"abc"),
        (b"\x9f\x9f\xff\xbf\xff\xff", [[], {}]),
    ],
)
def test_indefinite_length_items_decode_like_definite_ones(body: bytes, expected: Any) -> None:
    assert decode_value(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"\x9f\x01\x02",  # no break
        b"\xbf\x61a\xff",  # key without a value
        b"\x7f\x41a\xff",  # a byte-string chunk inside a text string
        b"\x5f\x61a\xff",  # a text chunk inside a byte string
        b"\x7f\x7f\x61a\xff\xff",  # nested indefinite chunk
        b"\xff",  # a lone break
    ],
)
def test_malformed_indefinite_length_items_are_refused(body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_value(body)


@pytest.mark.parametrize(
    "utf8",
    [b"\xc3\x28", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"abc\xe2\x82"],
    ids=["bad-continuation", "ff", "overlong-nul", "surrogate", "above-10ffff", "truncated"],
)
def test_invalid_utf8_text_is_refused(utf8: bytes) -> None:
    with pytest.raises(FrameError):
        decode_value(head(3, len(utf8)) + utf8)  # as a value
    with pytest.raises(FrameError):
        decode_value(b"\xa1" + head(3, len(utf8)) + utf8 + b"\x00")  # as a map key
    with pytest.raises(FrameError):
        decode_value(b"\x7f" + text("ok") + head(3, len(utf8)) + utf8 + b"\xff")  # in a chunk


def test_utf8_split_across_indefinite_chunks_is_refused() -> None:
    with pytest.raises(FrameError):
        decode_value(b"\x7f\x61\xc3\x61\xa9\xff")  # "é" cut in half: each chunk must be valid


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x1c",
        b"\xf8\x18",
        b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff\x00",
        b"\x9b\x7f\xff\xff\xff\xff\xff\xff\xff",
    ],
    ids=["empty", "reserved-info", "bad-simple", "huge-bytes-length", "huge-array-length"],
)
def test_malformed_heads_are_frame_errors(body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_value(body)


# --- hostile bytes against a server Connection ---------------------------------------

KNOWN_FIELDS = "t i m a k d md r c msg x n last v l auth agent".split()
EDGE_SCALARS = [
    0,
    1,
    8,
    -1,
    -0.5,
    2**16,
    2**32,
    2**63,
    2**64,
    10**400,
    -(10**400),
    math.nan,
    math.inf,
    "",
    "x" * 300,
]
nasty_scalars = scalars | st.sampled_from(EDGE_SCALARS) | st.integers(-2, 9)
limit_maps = st.dictionaries(
    st.sampled_from(["frame_bytes_max", "calls_inflight_max", "other"]) | texts,
    st.sampled_from(EDGE_SCALARS) | st.integers(-2, 2**32),
    max_size=3,
)
nasty_values = st.recursive(
    nasty_scalars | limit_maps,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(texts | st.sampled_from(KNOWN_FIELDS), children, max_size=4)
    ),
    max_leaves=12,
)
# One well-formed message of each kind; the strategy below breaks a field or two.
TEMPLATES: dict[int, dict[str, Any]] = {
    0: {"t": 0, "v": [1], "l": {"frame_bytes_max": 1 << 20, "calls_inflight_max": 8}, "agent": "fuzz"},
    1: {"t": 1, "i": 1, "m": "add", "a": [1, 2], "k": {"x": 1}, "d": 1.5, "md": {"trace_id": "t"}},
    2: {"t": 2, "i": 1, "r": None, "md": {}},
    3: {"t": 3, "i": 1, "c": 3, "msg": "bad", "x": {}},
    4: {"t": 4, "i": 1},
    5: {"t": 5, "n": 1},
    6: {"t": 6, "n": 1},
    7: {"t": 7, "last": 0, "c": 0, "msg": ""},
}


# Values on the edges of each field's rule, tried more often than random ones.
FIELD_EDGES: dict[str, list[Any]] = {
    "t": [-1, 8, 2**64, "1", None, 1.0, True],
    "i": [0, -1, 2**63 - 1, 2**63, "1", 1.0, True],
    "m": ["", "x" * 256, "x" * 257, b"add", 1, None],
    "a": [None, {}, "args", b"", [[[]]]],
    "k": [[], {"": 1}, {b"x": 1}, "kwargs"],
    "d": [-1, -0.0, math.nan, math.inf, 10**400, 2**64, 1e308, "1", True],
    "md": [[], {"x": math.nan}, "md"],
    "v": [[], [99], [1, 99], [0], [2**16], [1] * 17, [True], "1"],
    "l": [{"frame_bytes_max": 1}, {"frame_bytes_max": 0}, {"calls_inflight_max": 1}, {"x": "y"}, []],
    "n": [-1, 2**63, 2**64, None],
    "c": [-1, 2**32, 2**32 + 1, "3"],
    "last": [-1, 2**63, None],
    "msg": [None, b"msg", "x" * 10000],
    "x": [[], "x"],
    "r": [None, [math.nan]],
    "agent": [1, "x" * 10000],
}


@st.composite
def messages(draw: st.DrawFn) -> Any:
    """A template message of some kind with one or two fields removed or broken."""
    if draw(st.integers(0, 9)) == 0:
        return draw(nasty_values)  # not even a map, usually
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    message = dict(TEMPLATES[kind])
    for key in draw(st.lists(st.sampled_from(sorted(message)), min_size=1, max_size=2, unique=True)):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            del message[key]
        elif choice <= 3:
            message[key] = draw(st.sampled_from(FIELD_EDGES[key]))
        else:
            message[key] = draw(nasty_values)
    if draw(st.integers(0, 7)) == 0:
        message[draw(st.sampled_from(KNOWN_FIELDS) | texts)] = draw(nasty_values)
    return message


def drive_server(server: Connection, pieces: list[bytes], eof: bool) -> None:
    """Feed ``pieces`` the way the trio driver does and answer like it. Only a
    RemoteProtocolError may come out of the connection, and the goaway reporting it
    (and every answer the driver sends) must always be encodable."""
    try:
        for piece in [*pieces, *([b""] if eof else [])]:
            for event in server.receive_data(piece):
                if isinstance(event, Hello):
                    server.send_hello()  # whatever hello it accepted, it can answer
                elif isinstance(event, Call):
                    server.send_result(event.id, None)
                elif isinstance(event, CallRefused):
                    server.send_error(event.id, event.code, event.message, {"not_started": True})
                elif isinstance(event, Ping):
                    server.send_pong(event.nonce)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, int)
        server.send_goaway(exc.code, exc.message)
        server.close()


def opened_server(limits: Limits | None = None) -> Connection:
    server = Connection(Role.SERVER, limits)
    assert isinstance(server.receive_data(msg(CLIENT_HELLO))[0], Hello)
    server.send_hello()
    return server


@FUZZ
@given(
    data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 10**4), max_size=8), after_hello=st.booleans()
)
def test_random_bytes_only_raise_remote_protocol_error(
    data: bytes, cuts: list[int], after_hello: bool
) -> None:
    server = opened_server() if after_hello else Connection(Role.SERVER)
    drive_server(server, chunked(data, cuts), eof=True)


@FUZZ
@given(
    bodies=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10**4), max_size=8),
    after_hello=st.booleans(),
)
def test_random_frame_bodies_only_raise_remote_protocol_error(
    bodies: list[bytes], cuts: list[int], after_hello: bool
) -> None:
    server = opened_server() if after_hello else Connection(Role.SERVER)
    drive_server(server, chunked(b"".join(map(raw_frame, bodies)), cuts), eof=False)


@settings(FUZZ, max_examples=400)
@given(
    items=st.lists(messages(), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10**4), max_size=6),
    small=st.booleans(),
)
def test_random_messages_only_raise_remote_protocol_error(
    items: list[Any], cuts: list[int], small: bool
) -> None:
    limits = Limits(frame_bytes_max=1024, cbor_depth_max=4, calls_inflight_max=2) if small else None
    frames = [frame(encode_value(item)) for item in items]
    for one in frames:  # each alone, before and after the hello
        drive_server(Connection(Role.SERVER, limits), [one], eof=False)
        drive_server(opened_server(limits), [one], eof=False)
    drive_server(opened_server(limits), chunked(b"".join(frames), cuts), eof=True)  # all in a row


def valid_client_stream() -> bytes:
    """What a client sends after the hello exchange (a server takes nothing but a hello
    until it has answered one, so the hello is fed on its own)."""
    frames = [
        msg(
            {
                "t": 1,
                "i": 1,
                "m": "calc.add",
                "a": [1, 2],
                "k": {"x": [1.5, None]},
                "d": 2.5,
                "md": {"k": "v"},
            }
        ),
        msg({"t": 5, "n": 7}),
        msg({"t": 1, "i": 2, "m": "echo", "a": [{"nested": [b"bytes", "text", -(2**70)]}]}),
        msg({"t": 4, "i": 2}),
        msg({"t": 6, "n": 3}),
        msg({"t": 7, "last": 0, "c": 0, "msg": "bye"}),
    ]
    return b"".join(frames)


def test_the_unmutated_stream_is_valid() -> None:
    server = opened_server()
    events = server.receive_data(valid_client_stream())
    assert [type(e).__name__ for e in events] == ["Call", "Ping", "Call", "Cancel", "Pong", "GoAway"]


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 10**4), st.integers(0, 255)
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(
    edits=mutations,
    cuts=st.lists(st.integers(0, 10**4), max_size=10),
    eof=st.booleans(),
    hello=st.booleans(),
)
def test_mutated_valid_frames_only_raise_remote_protocol_error(
    edits: list[tuple[str, int, int]], cuts: list[int], eof: bool, hello: bool
) -> None:
    """Mutate either the hello (fed to a fresh server) or what follows it."""
    data = bytearray(msg(CLIENT_HELLO) if hello else valid_client_stream())
    for op, position, byte in edits:
        index = position % len(data)
        if op == "flip":
            data[index] ^= 1 << (byte % 8)
        elif op == "set":
            data[index] = byte
        elif op == "insert":
            data.insert(index, byte)
        elif len(data) > 1:
            del data[index]
    server = Connection(Role.SERVER) if hello else opened_server()
    drive_server(server, chunked(bytes(data), cuts), eof=eof)


# --- findings pinned as regressions ---------------------------------------------------


def test_a_huge_integer_deadline_is_a_protocol_error() -> None:
    """``math.isfinite(10**400)`` raises OverflowError: that escaped receive_data and took
    the whole trio server down."""
    server = opened_server()
    with pytest.raises(RemoteProtocolError, match="'d'"):
        server.receive_data(msg({"t": 1, "i": 1, "m": "add", "a": [], "d": 10**400}))


def test_a_hello_announcing_a_tiny_frame_bytes_max_is_refused() -> None:
    """Otherwise the server cannot encode its own hello (or any goaway) within the peer's
    limit, and the LocalProtocolError escaped the server driver."""
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="frame_bytes_max"):
        server.receive_data(msg({"t": 0, "v": [1], "l": {"frame_bytes_max": 8}}))
    server.send_goaway(Code.PROTOCOL_ERROR, "refused")  # still encodable: peer limits not adopted


def test_goaway_messages_are_bounded() -> None:
    """A protocol error's message can quote the peer's input (unknown field names,
    duplicate keys): the goaway carrying it must still fit any frame limit."""
    server = opened_server(Limits(frame_bytes_max=4096))
    flood = {"t": 5, "n": 1} | {f"k{i:04d}": 0 for i in range(500)}
    assert len(encode_value(flood)) < 4096
    with pytest.raises(RemoteProtocolError) as caught:
        server.receive_data(msg(flood))
    goaway = server.send_goaway(caught.value.code, caught.value.message)
    assert len(goaway) - 4 <= 4096
    client = Connection(Role.CLIENT)
    client.send_hello()
    client.receive_data(server_hello())
    assert isinstance(client.receive_data(goaway)[0], GoAway)


def server_hello() -> bytes:
    return msg({"t": 0, "v": [1], "l": {"frame_bytes_max": 1 << 20}})


def test_a_kept_decoder_decodes_each_message_alone() -> None:
    """ValueDecoder (one cbor2 decoder per connection) decodes message after message as
    decode_value would: the same values, the same refusals (trailing bytes, refused
    tags, too deep), and an error leaves it usable for the next message."""
    decoder = ValueDecoder(depth_max=8)
    messages = [{"t": 1, "id": i, "a": ["x" * i, i, {"k": [1.5, None, b"b"]}]} for i in range(5)]
    for message in messages:
        assert decoder.decode(encode_value(message)) == decode_value(encode_value(message))
    bad = [
        encode_value({"a": 1}) + b"\x00",  # trailing bytes
        cbor2.dumps(cbor2.CBORTag(28, [1])),  # a shared reference
        encode_value([[[[[[[[[[1]]]]]]]]]]),  # deeper than 8
        b"\xa1",  # truncated
    ]
    for data in bad:
        with pytest.raises(FrameError):
            decode_value(data, 8)
        with pytest.raises(FrameError):
            decoder.decode(data)
        assert decoder.decode(encode_value(messages[1])) == messages[1]
    large = {"blob": b"z" * LARGE_BYTES_MIN}
    assert decoder.decode(encode_value(large)) == large
