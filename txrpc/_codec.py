"""Framing and safe CBOR: a 4-byte big-endian length, then exactly one CBOR item.

Sans-IO: :class:`FrameDecoder` is fed bytes and yields frame bodies; nothing here
touches a socket. Decoding is hardened against the unsafe defaults of cbor2: the
length prefix is checked against ``frame_bytes_max`` before any body is buffered,
shared-reference tags 28/29 and string-reference tags 25/256 are refused, duplicate
map keys are refused, map keys and set elements must be text or byte strings, nesting
depth is bounded and trailing bytes after the item are an error.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

PREFIX_BYTES = 4
FRAME_BYTES_LIMIT = 2**31 - 1  # the largest length the prefix may announce at all


class FrameError(Exception):
    """A frame or its CBOR body is malformed; the message says how."""


def _refuse_shared_reference(decoder: Any, immutable: bool = False) -> Any:
    # cbor2 calls semantic decoders as (decoder, immutable).
    raise cbor2.CBORDecodeError("CBOR tags 28/29 (shared references) are not accepted")


def _refuse_string_reference(decoder: Any, immutable: bool = False) -> Any:
    raise cbor2.CBORDecodeError("CBOR tags 25/256 (string references) are not accepted")


def _refuse_parsed_text(decoder: Any, immutable: bool = False) -> Any:
    raise cbor2.CBORDecodeError("CBOR tags 35/36 (regular expression, MIME message) are not accepted")


# Tags 28/29 and 25/256 let a few bytes stand for many copies of a value: a tiny frame
# would expand when decoded or when a handler sends it back. Tags 35/36 would run the
# peer's text through re.compile / the email parser, and hand a handler a regular
# expression chosen by the peer (catastrophic backtracking when used): no RPC needs them.
_REFUSED_TAGS = {
    28: _refuse_shared_reference,
    29: _refuse_shared_reference,
    25: _refuse_string_reference,
    256: _refuse_string_reference,
    35: _refuse_parsed_text,
    36: _refuse_parsed_text,
}


_CONTAINERS = (dict, list, tuple, set, frozenset)


def check_keys(value: Any, depth: int = 0) -> None:
    """Raise ``TypeError`` if a map key or set element inside ``value`` is not a text or
    byte string: the peer would refuse the whole frame (see :func:`decode_value`), so a
    sender finds out here, for its own call, instead of losing the connection.
    Subclasses count as what they are encoded as (an ``OrderedDict`` is a map)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str and type(key) is not bytes:
                raise TypeError(
                    f"map keys must be text or byte strings, not {type(key).__name__} ({key!r:.40})"
                )
            if isinstance(item, _CONTAINERS):
                check_keys(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, _CONTAINERS):
                check_keys(item, depth + 1)
    elif isinstance(value, (set, frozenset)):
        for item in value:
            if type(item) is not str and type(item) is not bytes:
                raise TypeError(f"set elements must be text or byte strings, not {type(item).__name__}")


def encode_value(value: Any) -> bytes:
    """Encode one value as CBOR (no value sharing, definite lengths)."""
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise TypeError(f"value cannot be encoded as CBOR: {exc}") from None


def canonical(value: Any) -> bytes:
    """Canonical CBOR (sorted maps, shortest forms): stable bytes for fingerprints."""
    return cbor2.dumps(value, canonical=True)


def decode_value(data: bytes | memoryview, depth_max: int = 64) -> Any:
    """Decode exactly one CBOR item with safe settings, or raise :class:`FrameError`.

    Map keys and set elements must be text or byte strings (their hashes are seeded):
    integer, float or array keys can be crafted to share one Python hash, which makes
    building the map quadratic (a 1 MiB frame would block the event loop for minutes).

    A large message (a map, ``LARGE_BYTES_MIN`` bytes or more) has its top level read
    here, so that its large byte strings are sliced out (one copy) instead of going
    through cbor2 (slow for them); every other item is decoded by cbor2 as usual.
    """
    # A definite-length map (first byte 0xa0..0xbb) of a large message:
    if type(data) is bytes and len(data) >= LARGE_BYTES_MIN and 0xA0 <= data[0] <= 0xBB and depth_max > 2:
        try:
            return _LargeMessage(data, depth_max).decode()
        except _NotAMessage:
            pass  # not text keys: cbor2 decodes the whole, as for any other value
    buffer = io.BytesIO(data)
    return _decode_whole(_decoder(buffer, depth_max), buffer, len(data))


class ValueDecoder:
    """:func:`decode_value` for one connection's messages, with one cbor2 decoder kept
    for all of them: building a decoder costs about as much as decoding a small message."""

    __slots__ = ("_decoder", "depth_max")

    def __init__(self, depth_max: int = 64) -> None:
        self.depth_max = depth_max
        self._decoder = _decoder(io.BytesIO(), depth_max)

    def decode(self, data: bytes) -> Any:
        if len(data) >= LARGE_BYTES_MIN:
            # (Its own path; and the kept decoder then holds no large body alive.)
            return decode_value(data, self.depth_max)
        buffer = io.BytesIO(data)
        decoder = self._decoder
        decoder.fp = buffer
        return _decode_whole(decoder, buffer, len(data))


def _decode_whole(decoder: cbor2.CBORDecoder, buffer: io.BytesIO, length: int) -> Any:
    """The one item of ``buffer`` (``length`` bytes); trailing bytes are an error."""
    value = _decode_one(decoder)
    if buffer.tell() != length:
        raise FrameError(f"{length - buffer.tell()} trailing bytes after the CBOR item")
    return value


def _decode_one(decoder: cbor2.CBORDecoder) -> Any:
    """One item from ``decoder``; any decoding failure becomes a :class:`FrameError`."""
    try:
        return decoder.decode()
    except cbor2.CBORDecodeError as exc:
        raise FrameError(f"malformed CBOR: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise FrameError(f"malformed CBOR: {type(exc).__name__}: {exc}") from None


def _decoder(buffer: io.BytesIO, depth_max: int) -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        buffer,
        max_depth=depth_max,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
        semantic_decoders=_REFUSED_TAGS,
    )


class _NotAMessage(Exception):
    """A large map whose keys are not all text: decoded by cbor2 as a whole instead."""


class _LargeMessage:
    """The top level of a large CBOR map with text keys: definite-length heads of the
    map and of its array values read here, byte strings of ``LARGE_BYTES_MIN`` or more
    sliced out; everything else decoded by cbor2 with the usual settings, its depth
    limit reduced by the levels above it. Malformed input raises :class:`FrameError`."""

    __slots__ = ("buffer", "data", "decoder", "element_decoder", "view")

    def __init__(self, data: bytes, depth_max: int) -> None:
        self.data = data
        self.view = memoryview(data)
        self.buffer = io.BytesIO(data)
        self.decoder = _decoder(self.buffer, depth_max - 1)  # inside the map
        self.element_decoder = _decoder(self.buffer, depth_max - 2)  # inside an array in the map

    def decode(self) -> dict[str, Any]:
        count, position = self._head(0)
        out: dict[str, Any] = {}
        for _ in range(count):
            key, position = self._item(position, self.decoder)
            if type(key) is not str:
                raise _NotAMessage
            if key in out:
                raise FrameError(f"malformed CBOR: duplicate key {key!r:.40}")
            out[key], position = self._value(position)
        if position != len(self.data):
            raise FrameError(f"{len(self.data) - position} trailing bytes after the CBOR item")
        return out

    def _value(self, position: int) -> tuple[Any, int]:
        first = self._byte(position)
        if first >> 5 == 4 and first & 31 < 28:
            count, position = self._head(position)
            items = []
            for _ in range(count):
                item, position = self._bytes_or_item(position, self.element_decoder)
                items.append(item)
            return items, position
        return self._bytes_or_item(position, self.decoder)

    def _bytes_or_item(self, position: int, decoder: cbor2.CBORDecoder) -> tuple[Any, int]:
        first = self._byte(position)
        if first >> 5 == 2 and first & 31 in (26, 27):  # a byte string of 64 KiB or more
            length, start = self._head(position)
            end = start + length
            if end > len(self.data):
                raise FrameError(f"malformed CBOR: byte string of {length} bytes is truncated")
            return bytes(self.view[start:end]), end
        return self._item(position, decoder)

    def _item(self, position: int, decoder: cbor2.CBORDecoder) -> tuple[Any, int]:
        self.buffer.seek(position)
        value = _decode_one(decoder)
        return value, self.buffer.tell()

    def _byte(self, position: int) -> int:
        if position >= len(self.data):
            raise FrameError("malformed CBOR: premature end of data")
        return self.data[position]

    def _head(self, position: int) -> tuple[int, int]:
        """A definite length head at ``position``: (its argument, where its content starts)."""
        info = self._byte(position) & 31
        if info < 24:
            return info, position + 1
        if info > 27:
            raise FrameError("malformed CBOR: indefinite or reserved length where a definite one is expected")
        size = 1 << (info - 24)
        end = position + 1 + size
        if end > len(self.data):
            raise FrameError("malformed CBOR: premature end of data")
        return int.from_bytes(self.view[position + 1 : end], "big"), end


def frame(body: bytes) -> bytes:
    """Prefix an encoded body with its length."""
    return len(body).to_bytes(PREFIX_BYTES, "big") + body


LARGE_BYTES_MIN = 64 * 1024
"""Byte strings at least this long, at the top level of a message (a value, or an
element of a list value), are framed by :func:`encode_frame` itself: cbor2 copies
large byte strings slowly (~1.7 ms per MiB here, against ~0.05 ms for a copy)."""


def has_large_bytes(value: Any) -> bool:
    """A byte string of ``LARGE_BYTES_MIN`` or more, or a list/tuple holding one."""
    kind = type(value)
    if kind is bytes:
        return len(value) >= LARGE_BYTES_MIN
    if kind is list or kind is tuple:
        for item in value:
            if type(item) is bytes and len(item) >= LARGE_BYTES_MIN:
                return True
    return False


def encode_frame(message: dict[str, Any], large: bool = False) -> tuple[bytes, int]:
    """``frame(encode_value(message))`` and the body's length. With ``large`` (some
    top-level value :func:`has_large_bytes`) the same bytes are built without passing
    the large byte strings through cbor2: each is copied once, by the final join."""
    if not large:
        body = encode_value(message)
        return len(body).to_bytes(PREFIX_BYTES, "big") + body, len(body)
    parts = [b"", _head(5, len(message))]
    for key, value in message.items():
        parts.append(encode_value(key))
        kind = type(value)
        if kind is list or kind is tuple:
            parts.append(_head(4, len(value)))
            for item in value:
                _add_item(parts, item)
        else:
            _add_item(parts, value)
    length = sum(map(len, parts))
    parts[0] = length.to_bytes(PREFIX_BYTES, "big")
    return b"".join(parts), length


def _add_item(parts: list[bytes], value: Any) -> None:
    if type(value) is bytes and len(value) >= LARGE_BYTES_MIN:
        parts += (_head(2, len(value)), value)  # copied once, by the final join
    else:
        parts.append(encode_value(value))


def _head(major: int, length: int) -> bytes:
    """A CBOR item head in its shortest form (as cbor2 writes it)."""
    kind = major << 5
    if length < 24:
        return bytes((kind | length,))
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes((kind | extra,)) + length.to_bytes(size, "big")
    raise TypeError("a CBOR length above 2**64")


class FrameDecoder:
    """Accumulates received bytes and returns complete frame bodies.

    ``feed(data)`` returns the bodies completed by ``data``. A length prefix above
    ``frame_bytes_max`` raises :class:`FrameError` at once, before the body arrives.
    ``buffered_bytes`` tells how much is waiting for the rest of a frame.

    Each body is copied once: complete frames straight out of ``data``; a frame that
    spans reads is joined from its pieces when its last piece arrives. A large piece
    is kept as a view of the received bytes instead of being copied into a buffer
    (only when it is at least half of them, so memory held stays under twice the
    bytes buffered); small pieces are copied into one buffer, so a peer dribbling a
    frame byte by byte costs no more than the bytes themselves.
    """

    __slots__ = ("_have", "_length", "_parts", "_prefix", "frame_bytes_max")

    def __init__(self, frame_bytes_max: int) -> None:
        if not 0 < frame_bytes_max <= FRAME_BYTES_LIMIT:
            raise ValueError(f"frame_bytes_max must be in 1..{FRAME_BYTES_LIMIT}")
        self.frame_bytes_max = frame_bytes_max
        self._prefix = bytearray()  # the first bytes of a length prefix not yet complete
        self._length = -1  # body length of the frame being received (-1: between frames)
        self._parts: list[memoryview | bytearray] = []  # its body so far
        self._have = 0  # bytes in _parts

    @property
    def buffered_bytes(self) -> int:
        if self._length < 0:
            return len(self._prefix)
        return PREFIX_BYTES + self._have

    @property
    def bytes_wanted(self) -> int:
        """Bytes still missing from the frame being received (0 when between frames):
        a reader can ask for that much at once instead of many small reads."""
        return self._length - self._have if self._length >= 0 else 0

    def feed(self, data: bytes) -> list[bytes]:
        if type(data) is not bytes:
            data = bytes(data)  # views of it may be kept: it must not change
        bodies: list[bytes] = []
        view = memoryview(data)
        position = 0
        end = len(view)
        if self._prefix:
            prefix = self._prefix
            position = min(PREFIX_BYTES - len(prefix), end)
            prefix += view[:position]
            if len(prefix) < PREFIX_BYTES:
                return bodies
            self._length = self._checked_length(int.from_bytes(prefix, "big"))
            prefix.clear()
        if self._length >= 0:
            need = self._length - self._have
            if end - position < need:
                self._keep(view[position:], end)
                return bodies
            self._parts.append(view[position : position + need])
            position += need
            bodies.append(b"".join(self._parts))
            self._parts = []
            self._have = 0
            self._length = -1
        while end - position >= PREFIX_BYTES:
            length = self._checked_length(int.from_bytes(view[position : position + PREFIX_BYTES], "big"))
            start = position + PREFIX_BYTES
            if end - start < length:
                self._length = length
                self._keep(view[start:], end)
                return bodies
            bodies.append(bytes(view[start : start + length]))
            position = start + length
        if position < end:
            self._prefix += view[position:]
        return bodies

    def _keep(self, piece: memoryview, received: int) -> None:
        size = len(piece)
        if not size:
            return
        self._have += size
        parts = self._parts
        if size * 2 >= received and size >= 4096:
            parts.append(piece)  # a view: no copy, and it is most of what it holds alive
        elif parts and type(parts[-1]) is bytearray:
            parts[-1] += piece
        else:
            parts.append(bytearray(piece))

    def _checked_length(self, length: int) -> int:
        if length > self.frame_bytes_max:
            raise FrameError(f"frame of {length} bytes announced; frame_bytes_max is {self.frame_bytes_max}")
        if length == 0:
            raise FrameError("empty frame (length 0)")
        return length
