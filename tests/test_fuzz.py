"""The fuzz targets with a small count (the long runs are `make fuzz`; see README).

``TXRPC_FUZZ_EXAMPLES`` raises the counts (default 300 per test)."""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txrpc import _fuzz

EXAMPLES = int(os.environ.get("TXRPC_FUZZ_EXAMPLES", "300"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_decoder_survives_any_bytes(data: bytes) -> None:
    _fuzz.decoder_target(data)


@FUZZ_SETTINGS
@given(st.integers(0, 3), st.integers(0, 255), st.integers(0, 2**32))
def test_decoder_survives_mutated_conversations(mode: int, chunking: int, seed: int) -> None:
    """Real conversations (hello, calls, cancels, pings) with fields broken, cut anywhere."""
    _fuzz.decoder_target(bytes([mode, chunking]) + _fuzz.live_input_from_seed(seed))


def test_live_server_survives_hostile_connections() -> None:
    server = _fuzz.LiveServer()
    try:
        rng = random.Random(7)
        for index in range(EXAMPLES * 3):
            server.one_input(_fuzz.live_input_from_seed(10_000 + index))
            if index % 50 == 0:
                server.one_input(rng.randbytes(rng.randrange(1, 300)))

        @FUZZ_SETTINGS
        @given(st.binary(max_size=2048))
        def raw(data: bytes) -> None:
            server.one_input(_fuzz._hello() + data)

        raw()
        server.check()
        assert server.peak_rss_bytes() < 300 * 2**20
    finally:
        server.close()
