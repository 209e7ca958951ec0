"""Hand-made wire bytes for the codec, connection and bad-input tests.

Everything here builds bytes directly (CBOR heads written by hand where cbor2 would
refuse or normalise them), so the tests can send exactly what an attacker would.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from txrpc._codec import FrameDecoder, decode_value, encode_value, frame


def head(major: int, argument: int) -> bytes:
    """A CBOR initial byte plus argument (the shortest form)."""
    if argument < 24:
        return bytes([major << 5 | argument])
    for additional, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if argument < 1 << (8 * size):
            return bytes([major << 5 | additional]) + argument.to_bytes(size, "big")
    raise ValueError("argument too large for a CBOR head")


def text(value: str) -> bytes:
    raw = value.encode()
    return head(3, len(raw)) + raw


def msg(message: Any) -> bytes:
    """One framed message, encoded by txrpc itself."""
    return frame(encode_value(message))


def raw_frame(body: bytes) -> bytes:
    """A frame around an arbitrary (possibly invalid) CBOR body."""
    return len(body).to_bytes(4, "big") + body


CLIENT_HELLO = {"t": 0, "v": [1], "l": {"frame_bytes_max": 1 << 20, "calls_inflight_max": 64}}


def shared_reference_bomb(levels: int = 30) -> bytes:
    """A few hundred bytes that a naive decoder turns into 2**levels leaves.

    ``[28([0, 0]), 28([29(0), 29(0)]), 28([29(1), 29(1)]), ...]``: level ``k`` is a shared
    array holding two references to level ``k - 1``.
    """
    out = bytearray(head(4, levels))
    out += b"\xd8\x1c" + head(4, 2) + b"\x00\x00"
    for level in range(1, levels):
        reference = b"\xd8\x1d" + head(0, level - 1)
        out += b"\xd8\x1c" + head(4, 2) + reference + reference
    return bytes(out)


def count_leaves(value: Any, budget: int) -> int:
    """Leaves of a nested list, stopping once ``budget`` is exceeded (no blow-up)."""
    count = 0
    stack = [value]
    while stack and count <= budget:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    return count


def stringref_bomb(string_chars: int = 4096, references: int = 2000) -> bytes:
    """Tag 256 (string-reference namespace) with one long string and many tag-25
    references to it: ~3 bytes per copy of ``string_chars`` characters once expanded."""
    items = text("x" * string_chars) + b"\xd8\x19\x00" * references
    return b"\xd9\x01\x00" + head(4, references + 1) + items


def colliding_int_keys_map(count: int) -> bytes:
    """A map whose integer keys all share one Python hash (multiples of 2**61 - 1)."""
    modulus = 2**61 - 1
    items = b"".join(encode_value(k * modulus) + b"\x00" for k in range(1, count + 1))
    return head(5, count) + items


def nested_arrays(depth: int) -> bytes:
    """``[[[...[0]...]]]`` with ``depth`` arrays."""
    return b"\x81" * depth + b"\x00"


def call_with(**fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"t": 1, "i": 1, "m": "add", "a": [1, 2]}
    message.update(fields)
    return message


def raw_call(
    args: bytes = b"\x80", method: str = "echo", call_id: int = 1, extra: bytes = b"", extra_fields: int = 0
) -> bytes:
    """A framed call with its args given as raw CBOR (``args`` must be one item) and
    ``extra_fields`` raw key/value pairs appended verbatim in ``extra``."""
    body = (
        head(5, 4 + extra_fields)
        + text("t") + head(0, 1)
        + text("i") + head(0, call_id)
        + text("m") + text(method)
        + text("a") + args
        + extra
    )  # fmt: skip
    return raw_frame(body)


def call_with_raw_method(method_bytes: bytes, call_id: int = 1) -> bytes:
    """A framed call whose method is a text string holding ``method_bytes`` verbatim
    (which need not be valid UTF-8)."""
    body = (
        head(5, 4)
        + text("t") + head(0, 1)
        + text("i") + head(0, call_id)
        + text("m") + head(3, len(method_bytes)) + method_bytes
        + text("a") + head(4, 0)
    )  # fmt: skip
    return raw_frame(body)


def parse_frames(data: bytes, frame_bytes_max: int = 1 << 24) -> tuple[list[Any], int]:
    """Decode every complete frame in ``data``; return the messages and leftover bytes."""
    decoder = FrameDecoder(frame_bytes_max)
    messages = [decode_value(body) for body in decoder.feed(data)]
    return messages, decoder.buffered_bytes


async def read_until_eof(stream: trio.abc.ReceiveStream, timeout_s: float, bytes_max: int = 1 << 22) -> bytes:
    """Read until the peer closes (EOF or reset). Fails the test if that takes longer than
    ``timeout_s`` or the peer sends more than ``bytes_max``."""
    received = bytearray()
    with trio.fail_after(timeout_s):
        while len(received) <= bytes_max:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break  # reset: the peer is gone
            if not chunk:
                break
            received += chunk
    assert len(received) <= bytes_max, "peer kept sending"
    return bytes(received)


def same_value(a: Any, b: Any) -> bool:
    """Structural equality where NaN equals NaN and 0.0 differs from -0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)
