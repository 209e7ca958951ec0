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
    sender finds out here, for its own call, instead of losing the connection."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str and type(key) is not bytes:
                raise TypeError(
                    f"map keys must be text or byte strings, not {type(key).__name__} ({key!r:.40})"
                )
            if type(item) in _CONTAINERS:
                check_keys(item, depth + 1)
    elif kind is list or kind is tuple:
        for item in value:
            if type(item) in _CONTAINERS:
                check_keys(item, depth + 1)
    elif kind is set or kind is frozenset:
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
    """
    buffer = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        buffer,
        max_depth=depth_max,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
        semantic_decoders=_REFUSED_TAGS,
    )
    try:
        value = decoder.decode()
    except cbor2.CBORDecodeError as exc:
        raise FrameError(f"malformed CBOR: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise FrameError(f"malformed CBOR: {type(exc).__name__}: {exc}") from None
    if buffer.tell() != len(data):
        raise FrameError(f"{len(data) - buffer.tell()} trailing bytes after the CBOR item")
    return value


def frame(body: bytes) -> bytes:
    """Prefix an encoded body with its length."""
    return len(body).to_bytes(PREFIX_BYTES, "big") + body


class FrameDecoder:
    """Accumulates received bytes and returns complete frame bodies.

    ``feed(data)`` returns the bodies completed by ``data``. A length prefix above
    ``frame_bytes_max`` raises :class:`FrameError` at once, before the body arrives.
    ``buffered_bytes`` tells how much is waiting for the rest of a frame.
    """

    __slots__ = ("_buffer", "frame_bytes_max")

    def __init__(self, frame_bytes_max: int) -> None:
        if not 0 < frame_bytes_max <= FRAME_BYTES_LIMIT:
            raise ValueError(f"frame_bytes_max must be in 1..{FRAME_BYTES_LIMIT}")
        self.frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def bytes_wanted(self) -> int:
        """Bytes still missing from the frame being received (0 when between frames):
        a reader can ask for that much at once instead of many small reads."""
        buffer = self._buffer
        if len(buffer) < PREFIX_BYTES:
            return 0
        length = int.from_bytes(buffer[:PREFIX_BYTES], "big")
        return max(0, PREFIX_BYTES + length - len(buffer))

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        bodies: list[bytes] = []
        position = 0
        end = len(buffer)
        limit = self.frame_bytes_max
        while end - position >= PREFIX_BYTES:
            length = int.from_bytes(buffer[position : position + PREFIX_BYTES], "big")
            if length > limit:
                raise FrameError(f"frame of {length} bytes announced; frame_bytes_max is {limit}")
            if length == 0:
                raise FrameError("empty frame (length 0)")
            start = position + PREFIX_BYTES
            if end - start < length:
                break
            bodies.append(bytes(buffer[start : start + length]))
            position = start + length
        if position:
            del buffer[:position]
        return bodies
