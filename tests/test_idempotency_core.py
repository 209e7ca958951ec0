"""The sans-IO idempotency core: fingerprints and decisions, checked exhaustively."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from txrpc import _idempotency as idem
from txrpc._codec import canonical
from txrpc._errors import Code, InvalidArgument

# -- fingerprints ------------------------------------------------------------------

cbor_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
cbor_values = st.recursive(
    cbor_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
methods = st.text(min_size=1, max_size=20)
kwargs_maps = st.dictionaries(st.text(max_size=8), cbor_values, max_size=4)


def test_fingerprint_is_blake2b_of_canonical_cbor_and_pinned() -> None:
    digest = idem.fingerprint("bank.withdraw", ["alice", 10], {"memo": "rent"})
    assert len(digest) == idem.FINGERPRINT_BYTES == 16
    # The canonical CBOR of ["bank.withdraw", ["alice", 10], {"memo": "rent"}], written by hand.
    encoded = (
        bytes([0x83, 0x6D]) + b"bank.withdraw" + bytes([0x82, 0x65]) + b"alice" + bytes([0x0A, 0xA1, 0x64])
    ) + (b"memo" + bytes([0x64]) + b"rent")
    assert digest == hashlib.blake2b(encoded, digest_size=16, person=b"txrpc.idem.v1").digest()
    # Pinned: changing the encoding or the hash silently would orphan every stored key.
    assert digest.hex() == "ff6402ab2c0d3b29344c7e33fe332d80"


plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64) - 2, max_value=2**64 + 2)  # (both sides of the bignum edge)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
plain_args = st.lists(plain_scalars | st.lists(plain_scalars, max_size=4) | st.tuples(plain_scalars), max_size=4)


near_plain = plain_scalars | st.floats(width=16) | st.floats(allow_nan=False)  # (shortest float forms differ)


@settings(max_examples=500)
@given(
    methods,
    plain_args
    | st.lists(near_plain | st.lists(near_plain, max_size=3), max_size=4)
    | st.lists(cbor_values, max_size=4),
    st.dictionaries(st.text(max_size=8), near_plain | cbor_values, max_size=2),
)
@example("m", [1.5], {})
@example("m", [[0.0]], {"k": 2})
@example("m", [2**64], {})
@example("m", [], {"b": 1, "a": 2})
def test_the_plain_encoding_shortcut_is_byte_for_byte_canonical(
    method: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    """canonical_request skips the canonical encoder for arguments whose plain CBOR is
    already canonical; it must give the canonical encoder's bytes for every input."""
    assert idem.canonical_request(method, args, kwargs) == canonical([method, list(args), dict(kwargs)])


@pytest.mark.parametrize("kwargs", [{1.5: 2}, {b"k": 1}, {1: "x"}])
def test_the_shortcut_leaves_a_non_text_keyword_to_the_canonical_encoder(kwargs: dict[Any, Any]) -> None:
    """(Only a direct caller can pass one: the wire refuses non-text keys.)"""
    assert idem.canonical_request("m", [], kwargs) == canonical(["m", [], kwargs])


@given(methods, st.lists(cbor_values, max_size=4), kwargs_maps)
def test_fingerprint_ignores_map_order(method: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    reordered = dict(reversed(list(kwargs.items())))
    nested = [{k: v for k, v in reversed(list(a.items()))} if isinstance(a, dict) else a for a in args]
    assert idem.fingerprint(method, args, kwargs) == idem.fingerprint(method, nested, reordered)
    assert idem.fingerprint(method, tuple(args), kwargs) == idem.fingerprint(method, args, kwargs)


@given(
    methods,
    st.lists(cbor_values, max_size=3),
    kwargs_maps,
    methods,
    st.lists(cbor_values, max_size=3),
    kwargs_maps,
)
def test_fingerprints_differ_exactly_when_payloads_differ(
    m1: str, a1: list[Any], k1: dict[str, Any], m2: str, a2: list[Any], k2: dict[str, Any]
) -> None:
    same_payload = canonical([m1, a1, k1]) == canonical([m2, a2, k2])
    assert (idem.fingerprint(m1, a1, k1) == idem.fingerprint(m2, a2, k2)) == same_payload


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("m", [1], {}), ("n", [1], {})),  # method
        (("m", [1], {}), ("m", [], {"x": 1})),  # positional vs keyword
        (("m", [1], {}), ("m", [1.0], {})),  # int vs float
        (("m", [1], {}), ("m", [True], {})),  # int vs bool
        (("m", ["a"], {}), ("m", [b"a"], {})),  # text vs bytes
        (("m", [[1, 2]], {}), ("m", [[2, 1]], {})),  # list order matters
        (("m", [None], {}), ("m", [], {})),
    ],
)
def test_fingerprint_distinguishes(left: tuple[Any, ...], right: tuple[Any, ...]) -> None:
    assert idem.fingerprint(*left) != idem.fingerprint(*right)


def test_fingerprint_does_not_depend_on_the_hash_seed() -> None:
    # Sets iterate in hash order (which PYTHONHASHSEED changes); canonical CBOR sorts them.
    code = (
        "from txrpc import _idempotency as i\n"
        "print(i.fingerprint('m', [{'alpha', 'beta', 'gamma', 'delta'}], {'z': 1, 'y': 2}).hex())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outputs) == 1


def test_unencodable_arguments_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="not CBOR-encodable"):
        idem.fingerprint("m", [object()], {})


# -- keys ------------------------------------------------------------------------------


def test_check_key() -> None:
    assert idem.check_key("order-42") == "order-42"
    assert idem.check_key("k" * idem.KEY_CHARS_MAX)
    for bad in ("", "k" * (idem.KEY_CHARS_MAX + 1), "line\nbreak", 42, None, b"bytes"):
        with pytest.raises(InvalidArgument):
            idem.check_key(bad)


# -- decisions -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    fingerprint: bytes
    state: str
    attempt: int
    lease_expires_at: float


fingerprints = st.sampled_from([b"\x00" * 16, b"\x01" * 16, b"\x02" * 16])
times = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
rows = st.builds(
    Row,
    method=st.sampled_from(["a", "b"]),
    fingerprint=fingerprints,
    state=st.sampled_from([idem.STATE_IN_PROGRESS, idem.STATE_COMPLETED]),
    attempt=st.integers(min_value=1, max_value=10**6),
    lease_expires_at=times,
)


@given(st.none() | rows, fingerprints, times)
@settings(max_examples=500)
def test_decide_matches_the_specification(existing: Row | None, fingerprint: bytes, now: float) -> None:
    decision = idem.decide(existing, fingerprint, now, method="m")
    if existing is None:
        assert decision == idem.Run()
    elif existing.fingerprint != fingerprint:
        assert decision == idem.Mismatch(stored_method=existing.method, method="m")
    elif existing.state == idem.STATE_COMPLETED:
        assert decision == idem.Replay(existing)
    elif existing.lease_expires_at > now:
        assert decision == idem.InProgress(existing.attempt, existing.lease_expires_at - now)
        assert decision.retry_after_s > 0
    else:
        assert decision == idem.TakeOver(attempt_seen=existing.attempt)


@pytest.mark.parametrize(
    ("state", "fingerprint", "lease", "now", "expected"),
    [
        ("in_progress", b"F", 10.0, 9.999, idem.InProgress),
        ("in_progress", b"F", 10.0, 10.0, idem.TakeOver),  # a lease ends at its expiry instant
        ("in_progress", b"F", 10.0, 10.001, idem.TakeOver),
        ("in_progress", b"G", 10.0, 99.0, idem.Mismatch),  # mismatch wins over take-over
        ("completed", b"F", 10.0, 1.0, idem.Replay),
        ("completed", b"G", 10.0, 1.0, idem.Mismatch),  # mismatch wins over replay
    ],
)
def test_decide_boundaries(state: str, fingerprint: bytes, lease: float, now: float, expected: type) -> None:
    assert isinstance(idem.decide(Row("m", fingerprint, state, 3, lease), b"F", now), expected)


def test_decide_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="unknown state"):
        idem.decide(Row("m", b"F", "exploded", 1, 0.0), b"F", 1.0)
    for now in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            idem.decide(None, b"F", now)


def test_decisions_map_to_wire_errors() -> None:
    mismatch = idem.Mismatch(stored_method="bank.withdraw", method="bank.deposit").to_error()
    assert mismatch.code is Code.IDEMPOTENCY_KEY_MISMATCH
    assert mismatch.details == {"stored_method": "bank.withdraw", "method": "bank.deposit"}
    busy = idem.InProgress(attempt=2, retry_after_s=1.5).to_error()
    assert busy.code is Code.REQUEST_IN_PROGRESS and busy.details["retry_after_s"] == 1.5


# -- the decisions composed with a guarded log: at most one live executor -----------


@dataclasses.dataclass
class ModelRow:
    method: str
    fingerprint: bytes
    state: str
    attempt: int
    lease_expires_at: float
    outcome: int | None = None


events = st.lists(
    st.tuples(
        st.sampled_from(["request", "finish", "advance"]),
        st.sampled_from([b"F", b"G"]),
        st.floats(min_value=0.0, max_value=15.0),
    ),
    max_size=40,
)


@given(events)
@settings(max_examples=300)
def test_driver_model_runs_each_key_at_most_once_at_a_time(schedule: list[tuple[str, bytes, float]]) -> None:
    """Drive decide() the way the server does, against a log with storage's guards.

    Checks: an executor starts only when no other executor holds a live lease; only
    the current attempt can complete; once completed, every same-payload request
    replays that one outcome and nothing runs again.
    """
    lease_s = 10.0
    now = 0.0
    row: ModelRow | None = None
    executors: list[int] = []  # attempts that were started and have not finished
    finished_outcome: int | None = None
    for action, fingerprint, amount in schedule:
        if action == "advance":
            now += amount
        elif action == "request":
            decision = idem.decide(row, fingerprint, now)
            if isinstance(decision, idem.Run):
                assert row is None
                row = ModelRow("m", fingerprint, idem.STATE_IN_PROGRESS, 1, now + lease_s)
                executors.append(1)
            elif isinstance(decision, idem.TakeOver):
                assert row is not None and row.state == idem.STATE_IN_PROGRESS
                assert row.lease_expires_at <= now  # the previous executor's lease is over
                # storage's guard: attempt unchanged and lease ended
                assert row.attempt == decision.attempt_seen
                row.attempt += 1
                row.lease_expires_at = now + lease_s
                executors.append(row.attempt)
            elif isinstance(decision, idem.Replay):
                assert row is not None and row.fingerprint == fingerprint and row.outcome == finished_outcome
            elif isinstance(decision, idem.InProgress):
                assert row is not None and row.lease_expires_at > now and not row.outcome
            else:
                assert isinstance(decision, idem.Mismatch)
                assert row is not None and row.fingerprint != fingerprint
        elif executors:  # "finish": the oldest running executor tries to complete
            attempt = executors.pop(0)
            assert row is not None
            if row.state == idem.STATE_IN_PROGRESS and row.attempt == attempt:  # storage's guard
                row.state = idem.STATE_COMPLETED
                row.outcome = finished_outcome = 1000 + attempt
        # Invariant: at most one executor whose attempt is the row's current one.
        current = [a for a in executors if row is not None and a == row.attempt]
        assert len(current) <= 1
        if row is not None and row.state == idem.STATE_COMPLETED:
            assert finished_outcome is not None and row.outcome == finished_outcome
