"""The sans-IO connection state machine (txrpc/_connection.py): a client Connection and a
server Connection wired back to back in memory, no trio, no sockets."""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest
from _wire_helpers import msg
from hypothesis import given, settings
from hypothesis import strategies as st

from txrpc import Code, Limits
from txrpc._codec import check_keys, decode_value, encode_value
from txrpc._connection import (
    CALL_ID_MAX,
    PROTOCOL_VERSIONS,
    Call,
    CallRefused,
    Cancel,
    Connection,
    ConnectionClosed,
    Error,
    Event,
    GoAway,
    Hello,
    LocalProtocolError,
    Ping,
    Pong,
    RemoteProtocolError,
    Result,
    Role,
    State,
)


def body_of(data: bytes) -> Any:
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    return decode_value(data[4:])


def one(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


def open_pair(
    client_limits: Limits | None = None, server_limits: Limits | None = None
) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, client_limits)
    server = Connection(Role.SERVER, server_limits)
    hello = one(server.receive_data(client.send_hello(agent="test-client")))
    assert isinstance(hello, Hello)
    assert isinstance(one(client.receive_data(server.send_hello(agent="test-server"))), Hello)
    return client, server


def opened_server(limits: Limits | None = None) -> Connection:
    return open_pair(server_limits=limits)[1]


# --- hello and version negotiation -------------------------------------------------


def test_hello_exchange_opens_both_sides_and_shares_limits() -> None:
    client = Connection(Role.CLIENT, Limits(frame_bytes_max=4096, calls_inflight_max=7))
    server = Connection(Role.SERVER, Limits(frame_bytes_max=8192, calls_inflight_max=9))
    assert not client.is_open and not server.is_open
    hello = one(server.receive_data(client.send_hello(auth={"token": "t"}, agent="me")))
    assert hello == Hello(
        PROTOCOL_VERSIONS, {"frame_bytes_max": 4096, "calls_inflight_max": 7}, {"token": "t"}, "me"
    )
    assert not server.is_open  # open once it has answered
    answer = server.send_hello()
    assert server.is_open and server.version == PROTOCOL_VERSIONS[-1]
    assert body_of(answer)["v"] == [PROTOCOL_VERSIONS[-1]]
    assert "auth" not in body_of(answer)
    assert isinstance(one(client.receive_data(answer)), Hello)
    assert client.is_open and client.accepts_calls and client.version == server.version
    assert client.peer_limits == {"frame_bytes_max": 8192, "calls_inflight_max": 9}
    assert server.peer_limits == {"frame_bytes_max": 4096, "calls_inflight_max": 7}


def test_server_picks_the_highest_common_version() -> None:
    server = Connection(Role.SERVER)
    hello = one(server.receive_data(msg({"t": 0, "v": [99, 1, 7]})))
    assert isinstance(hello, Hello) and hello.versions == (99, 1, 7)
    assert body_of(server.send_hello())["v"] == [1]


def test_no_common_version_is_failed_precondition() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError) as caught:
        server.receive_data(msg({"t": 0, "v": [99], "l": {}}))
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert "99" in caught.value.message and "[1]" in caught.value.message  # both lists
    assert not server.is_open
    with pytest.raises(LocalProtocolError):
        server.send_hello()  # nothing to answer
    # The refusing goaway reaches a client that is still waiting for the hello.
    client = Connection(Role.CLIENT)
    client.send_hello()
    goaway = one(client.receive_data(server.send_goaway(caught.value.code, caught.value.message)))
    assert isinstance(goaway, GoAway) and goaway.code == Code.FAILED_PRECONDITION
    assert not client.accepts_calls


def test_client_checks_the_servers_hello() -> None:
    early = Connection(Role.CLIENT)
    with pytest.raises(RemoteProtocolError, match="before the client"):
        early.receive_data(msg({"t": 0, "v": [1]}))
    several = Connection(Role.CLIENT)
    several.send_hello()
    with pytest.raises(RemoteProtocolError, match="exactly one"):
        several.receive_data(msg({"t": 0, "v": [1, 2]}))
    unknown = Connection(Role.CLIENT)
    unknown.send_hello()
    with pytest.raises(RemoteProtocolError) as caught:
        unknown.receive_data(msg({"t": 0, "v": [2]}))
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert not unknown.is_open


@pytest.mark.parametrize(
    "hello",
    [
        {"t": 0},
        {"t": 0, "v": []},
        {"t": 0, "v": 1},
        {"t": 0, "v": [-1]},
        {"t": 0, "v": [2**16]},
        {"t": 0, "v": [True]},
        {"t": 0, "v": [1] * 17},
        {"t": 0, "v": [1], "l": []},
        {"t": 0, "v": [1], "l": {"frame_bytes_max": 0}},
        {"t": 0, "v": [1], "l": {"frame_bytes_max": "big"}},
        {"t": 0, "v": [1], "l": {"frame_bytes_max": 8}},  # too small to carry a hello back
        {"t": 0, "v": [1], "agent": 7},
    ],
)
def test_malformed_hello_is_refused(hello: dict[str, Any]) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(msg(hello))
    assert not server.is_open


def test_messages_before_the_hello_are_refused() -> None:
    for message in ({"t": 1, "i": 1, "m": "add", "a": []}, {"t": 5, "n": 1}, {"t": 4, "i": 1}):
        server = Connection(Role.SERVER)
        with pytest.raises(RemoteProtocolError, match="hello first"):
            server.receive_data(msg(message))
    # Even when the hello comes first in the same read: the server has not answered it.
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="hello first"):
        server.receive_data(msg({"t": 0, "v": [1]}) + msg({"t": 1, "i": 1, "m": "add", "a": []}))
    client = Connection(Role.CLIENT)
    client.send_hello()
    with pytest.raises(RemoteProtocolError, match="hello first"):
        client.receive_data(msg({"t": 2, "i": 1, "r": 3}))


def test_second_hello_is_refused_both_ways() -> None:
    client, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="second hello"):
        server.receive_data(msg({"t": 0, "v": [1]}))
    with pytest.raises(RemoteProtocolError, match="second hello"):
        client.receive_data(msg({"t": 0, "v": [1]}))
    with pytest.raises(LocalProtocolError):
        client.send_hello()
    with pytest.raises(LocalProtocolError):
        server.send_hello()


# --- calls and answers ----------------------------------------------------------------


def test_call_and_result_round_trip() -> None:
    client, server = open_pair()
    call_id = client.next_call_id()
    data = client.send_call(
        call_id, "calc.add", (1, 2), {"scale": 10}, deadline_s=1.25, metadata={"trace_id": "abc"}
    )
    assert client.inflight == {call_id}
    call = one(server.receive_data(data))
    assert call == Call(call_id, "calc.add", [1, 2], {"scale": 10}, 1.25, {"trace_id": "abc"})
    assert server.inflight == {call_id}
    result = one(client.receive_data(server.send_result(call_id, {"sum": 30}, metadata={"replayed": False})))
    assert result == Result(call_id, {"sum": 30}, {"replayed": False})
    assert client.inflight == set() and server.inflight == set()
    assert client.next_call_id() == call_id + 1


result_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    st.integers(min_value=1, max_value=CALL_ID_MAX),
    result_values,
    st.none() | st.dictionaries(st.text(max_size=6), st.booleans() | st.integers(), max_size=2),
)
def test_a_result_sent_already_encoded_is_the_same_frame(call_id: int, value: Any, metadata: Any) -> None:
    """send_result_encoded (a keyed call's outcome, encoded once for the request log)
    writes byte for byte what send_result writes."""
    frames = []
    for send in ("plain", "encoded"):
        _, server = open_pair()
        server.inflight.add(call_id)
        if send == "plain":
            frames.append(server.send_result(call_id, value, metadata))
        else:
            frames.append(server.send_result_encoded(call_id, encode_value(value), metadata))
        assert server.inflight == set()
    assert frames[0] == frames[1]


@pytest.mark.parametrize(
    "value",
    [collections.OrderedDict({1: 2}), [collections.Counter([1])], (collections.defaultdict(int, {2.5: 1}),)],
)
def test_subclasses_of_maps_are_checked_for_their_keys_too(value: Any) -> None:
    """cbor2 writes a dict subclass as a map: its keys must be checked like a dict's, or
    the peer refuses the whole frame (and a keyed call would replay that reply forever)."""
    _, server = open_pair()
    server.inflight.add(1)
    with pytest.raises(TypeError, match="map keys must be text or byte strings"):
        server.send_result(1, value)
    with pytest.raises(TypeError, match="map keys must be text or byte strings"):
        check_keys(value)


def test_an_encoded_result_over_the_peers_frame_limit_is_refused() -> None:
    client, server = open_pair(client_limits=Limits(frame_bytes_max=1024))
    server.receive_data(client.send_call(1, "big", []))
    with pytest.raises(LocalProtocolError, match="exceeds frame_bytes_max"):
        server.send_result_encoded(1, encode_value(b"x" * 2000))


def test_error_round_trip() -> None:
    client, server = open_pair()
    server.receive_data(client.send_call(1, "transfer", ["a", "b", 5]))
    error = one(client.receive_data(server.send_error(1, Code.ABORTED, "conflict", {"retry_after_s": 0.5})))
    assert error == Error(1, Code.ABORTED, "conflict", {"retry_after_s": 0.5})
    assert client.inflight == set() and server.inflight == set()


def test_many_calls_answered_out_of_order() -> None:
    client, server = open_pair()
    data = b"".join(client.send_call(i, "echo", [i]) for i in range(1, 51))
    calls = server.receive_data(data)
    assert [c.id for c in calls if isinstance(c, Call)] == list(range(1, 51))
    answers = b"".join(server.send_result(i, i * 2) for i in reversed(range(1, 51)))
    results = client.receive_data(answers)
    assert {(r.id, r.value) for r in results if isinstance(r, Result)} == {(i, i * 2) for i in range(1, 51)}
    assert client.inflight == set() and server.inflight == set()


def test_deadline_travels_as_non_negative_seconds() -> None:
    client, server = open_pair()
    assert one(server.receive_data(client.send_call(1, "f", [], deadline_s=-3))).deadline_s == 0.0
    assert one(server.receive_data(client.send_call(2, "f", [], deadline_s=None))).deadline_s is None
    assert one(server.receive_data(client.send_call(3, "f", [], deadline_s=math.inf))).deadline_s is None
    int_deadline = one(server.receive_data(msg({"t": 1, "i": 4, "m": "f", "a": [], "d": 2})))
    assert isinstance(int_deadline, Call) and int_deadline.deadline_s == 2.0
    assert type(int_deadline.deadline_s) is float


def test_cancel_round_trip_and_an_answer_that_crosses_it() -> None:
    client, server = open_pair()
    server.receive_data(client.send_call(1, "slow", []))
    cancel = one(server.receive_data(client.send_cancel(1)))
    assert cancel == Cancel(1)
    assert client.inflight == set()
    assert server.inflight == {1}  # until the driver abandons or answers it
    late = server.send_result(1, "done anyway")  # crossed the cancel on the wire
    assert one(client.receive_data(late)) == Result(1, "done anyway", {})
    server.receive_data(client.send_call(2, "slow", []))
    server.receive_data(client.send_cancel(2))
    server.abandon_call(2)
    assert server.inflight == set()


def test_ping_pong_both_ways() -> None:
    client, server = open_pair()
    assert one(server.receive_data(client.send_ping(42))) == Ping(42)
    assert one(client.receive_data(server.send_pong(42))) == Pong(42)
    assert one(client.receive_data(server.send_ping(2**63 - 1))) == Ping(2**63 - 1)
    assert one(server.receive_data(client.send_pong(2**63 - 1))) == Pong(2**63 - 1)


def test_server_goaway_names_the_last_call_taken() -> None:
    client, server = open_pair()
    server.receive_data(client.send_call(1, "f", []) + client.send_call(5, "f", []))
    goaway = one(client.receive_data(server.send_goaway(Code.UNAVAILABLE, "shutting down")))
    assert goaway == GoAway(5, Code.UNAVAILABLE, "shutting down")
    assert client.remote_goaway == goaway and not client.accepts_calls
    with pytest.raises(LocalProtocolError):
        client.send_call(6, "f", [])
    # Calls already taken are still answered after the goaway.
    assert one(client.receive_data(server.send_result(5, "ok"))) == Result(5, "ok", {})


def test_client_goaway_reaches_the_server() -> None:
    client, server = open_pair()
    goaway = one(server.receive_data(client.send_goaway()))
    assert goaway == GoAway(0, 0, "")
    assert server.remote_goaway == goaway
    assert not client.accepts_calls


def test_duplicate_in_flight_call_id_is_refused() -> None:
    client, server = open_pair()
    server.receive_data(client.send_call(7, "f", []))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.send_call(7, "f", [])
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        server.receive_data(msg({"t": 1, "i": 7, "m": "g", "a": []}))


def test_calls_over_calls_inflight_max_are_refused_not_run() -> None:
    client, server = open_pair(server_limits=Limits(calls_inflight_max=2))
    events = server.receive_data(b"".join(client.send_call(i, "f", []) for i in (1, 2, 3)))
    assert [type(e) for e in events] == [Call, Call, CallRefused]
    refused = events[2]
    assert isinstance(refused, CallRefused) and refused.id == 3 and refused.code == Code.RESOURCE_EXHAUSTED
    assert server.inflight == {1, 2}
    error = one(
        client.receive_data(server.send_error(3, refused.code, refused.message, {"not_started": True}))
    )
    assert isinstance(error, Error) and error.details == {"not_started": True}
    server.send_result(1, None)
    assert isinstance(one(server.receive_data(client.send_call(4, "f", []))), Call)  # room again


def test_calls_crossing_a_server_goaway_are_refused_as_unavailable() -> None:
    client, server = open_pair()
    server.receive_data(client.send_call(1, "f", []))
    goaway_bytes = server.send_goaway(Code.UNAVAILABLE, "draining")
    late_call = client.send_call(2, "f", [])  # sent before the goaway arrived
    refused = one(server.receive_data(late_call))
    assert isinstance(refused, CallRefused) and refused.code == Code.UNAVAILABLE
    assert server.inflight == {1}
    goaway = one(client.receive_data(goaway_bytes))
    assert isinstance(goaway, GoAway) and goaway.last_id == 1 < 2  # 2 never ran
    assert isinstance(one(server.receive_data(client.send_ping(1))), Ping)  # still served


def test_client_tolerates_answers_for_unknown_ids() -> None:
    client, _ = open_pair()
    client.send_call(1, "f", [])
    assert one(client.receive_data(msg({"t": 2, "i": 999, "r": "late"}))) == Result(999, "late", {})
    assert one(client.receive_data(msg({"t": 3, "i": 998, "c": 1, "msg": "gone"}))) == Error(
        998, 1, "gone", {}
    )
    assert client.inflight == {1} and client.is_open


# --- malformed messages -------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"t": 1, "i": 1, "m": "f", "a": [], "extra": 1},
        {"t": 5, "n": 1, "i": 1},  # a field of another kind
        {"t": 4, "i": 1, "r": None},
        {"t": 7, "last": 0, "c": 0, "msg": "", "why": "x"},
    ],
)
def test_unknown_fields_are_refused(message: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown fields"):
        opened_server().receive_data(msg(message))


@pytest.mark.parametrize("kind", [8, 99, -1, 2**64, "1", 1.0, True, None, [1]])
def test_unknown_kinds_are_refused(kind: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="kind"):
        opened_server().receive_data(msg({"t": kind, "i": 1}))
    with pytest.raises(RemoteProtocolError, match="kind"):
        opened_server().receive_data(msg({"i": 1}))  # no kind at all


@pytest.mark.parametrize("message", [[1, 2], "call", 1, None, b"\x00"])
def test_a_message_must_be_a_map(message: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="map"):
        opened_server().receive_data(msg(message))


CALL = {"t": 1, "i": 1, "m": "f", "a": []}


@pytest.mark.parametrize(
    "fields",
    [
        {"i": 0},  # reserved
        {"i": -1},
        {"i": CALL_ID_MAX + 1},
        {"i": "1"},
        {"i": True},
        {"m": ""},
        {"m": "x" * 257},
        {"m": b"f"},
        {"m": None},
        {"a": None},
        {"a": {"x": 1}},
        {"a": "args"},
        {"k": [1]},
        {"k": {b"bytes": 1}},
        {"d": -0.5},
        {"d": math.nan},
        {"d": math.inf},
        {"d": 10**400},  # does not fit a float
        {"d": "1"},
        {"d": True},
        {"md": [1]},
        {"md": {b"k": 1}},
    ],
)
def test_malformed_call_fields_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        opened_server().receive_data(msg(CALL | fields))


def test_call_field_edges_that_are_legal() -> None:
    server = opened_server()
    longest = one(server.receive_data(msg(CALL | {"i": CALL_ID_MAX, "m": "x" * 256, "d": 0, "k": {}})))
    assert isinstance(longest, Call) and longest.id == CALL_ID_MAX and longest.kwargs == {}


@pytest.mark.parametrize(
    "message",
    [
        {"t": 1, "i": 1, "m": "f"},  # args are required (specs/wire.cddl)
        {"t": 1, "m": "f", "a": []},
        {"t": 4},
        {"t": 5},
        {"t": 7, "last": 0, "c": 0},  # msg is required
        {"t": 7, "last": -1, "c": 0, "msg": ""},
        {"t": 7, "last": 0, "c": 2**32 + 1, "msg": ""},
    ],
)
def test_missing_or_malformed_fields_of_other_kinds_are_refused(message: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        opened_server().receive_data(msg(message))


@pytest.mark.parametrize(
    "message",
    [
        {"t": 2, "i": 1},  # result without r
        {"t": 2, "i": -1, "r": 1},
        {"t": 2, "i": 1, "r": 1, "md": [1]},
        {"t": 3, "i": 1, "c": 3},  # error without msg
        {"t": 3, "i": 1, "c": -3, "msg": ""},
        {"t": 3, "i": 1, "c": 3, "msg": b"bytes"},
        {"t": 3, "i": 1, "c": 3, "msg": "", "x": [1]},
        {"t": 6, "n": -1},
    ],
)
def test_malformed_answers_are_refused_by_the_client(message: dict[str, Any]) -> None:
    client, _ = open_pair()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(msg(message))


def test_messages_from_the_wrong_role_are_refused() -> None:
    client, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="server does not send calls"):
        client.receive_data(msg({"t": 1, "i": 1, "m": "f", "a": []}))
    with pytest.raises(RemoteProtocolError, match="server does not send cancel"):
        client.receive_data(msg({"t": 4, "i": 1}))
    with pytest.raises(RemoteProtocolError, match="client does not send results"):
        server.receive_data(msg({"t": 2, "i": 1, "r": 1}))
    with pytest.raises(RemoteProtocolError, match="client does not send results"):
        opened_server().receive_data(msg({"t": 3, "i": 1, "c": 1, "msg": ""}))


def test_end_of_stream() -> None:
    client, server = open_pair()
    assert one(server.receive_data(b"")) == ConnectionClosed()
    assert server.state is State.CLOSED
    assert server.receive_data(msg({"t": 5, "n": 1})) == []  # nothing after close
    partial = client.send_ping(1)[:-1]
    assert client.receive_data(partial) == []
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        client.receive_data(b"")


# --- illegal local sends ----------------------------------------------------------------


def test_illegal_local_sends_raise_local_protocol_error() -> None:
    client, server = open_pair()
    with pytest.raises(LocalProtocolError, match="only a client sends calls"):
        server.send_call(1, "f", [])
    with pytest.raises(LocalProtocolError, match="only a client cancels"):
        server.send_cancel(1)
    with pytest.raises(LocalProtocolError, match="only a server answers"):
        client.send_result(1, None)
    with pytest.raises(LocalProtocolError, match="only a server answers"):
        client.send_error(1, 1, "x")
    with pytest.raises(LocalProtocolError, match="not in flight"):
        server.send_result(12345, None)
    server.receive_data(client.send_call(1, "f", []))
    server.send_result(1, None)
    with pytest.raises(LocalProtocolError, match="not in flight"):
        server.send_result(1, None)  # answered twice


def test_calls_before_the_connection_is_open_are_local_errors() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send_call(1, "f", [])
    client.send_hello()
    with pytest.raises(LocalProtocolError):
        client.send_call(1, "f", [])  # hello sent, not answered
    assert client.inflight == set()


@pytest.mark.parametrize(
    ("call_id", "method", "metadata", "deadline_s"),
    [
        (0, "f", None, None),
        (-1, "f", None, None),
        (CALL_ID_MAX + 1, "f", None, None),
        (1, "", None, None),
        (1, "x" * 257, None, None),
        (1, b"f", None, None),
        (1, "f", {1: "not text"}, None),
        (1, "f", None, math.nan),
    ],
)
def test_a_call_the_server_would_refuse_is_a_local_error(
    call_id: Any, method: Any, metadata: Any, deadline_s: Any
) -> None:
    """Sending it would earn a goaway that ends every call on the connection."""
    client, _ = open_pair()
    with pytest.raises(LocalProtocolError):
        client.send_call(call_id, method, [], metadata=metadata, deadline_s=deadline_s)
    assert client.inflight == set()


def test_oversized_messages_are_local_errors() -> None:
    client, server = open_pair(server_limits=Limits(frame_bytes_max=2048))
    with pytest.raises(LocalProtocolError, match="exceeds frame_bytes_max 2048"):
        client.send_call(1, "f", ["x" * 3000])  # the server's limit, announced in its hello
    assert client.inflight == set()
    assert isinstance(one(server.receive_data(client.send_call(2, "f", ["x" * 1000]))), Call)
    with pytest.raises(LocalProtocolError, match="exceeds frame_bytes_max"):
        server.send_result(2, "y" * 5000)  # over its own limit
    big_client, big_server = open_pair(client_limits=Limits(frame_bytes_max=1024))
    big_server.receive_data(big_client.send_call(1, "f", []))
    with pytest.raises(LocalProtocolError, match="exceeds frame_bytes_max 1024"):
        big_server.send_result(1, "z" * 2000)  # over the client's announced limit
    big_server.send_error(1, Code.RESOURCE_EXHAUSTED, "result too large")  # the driver's fallback fits


def test_refused_frames_count_against_frame_bytes_max_before_decoding() -> None:
    server = opened_server(Limits(frame_bytes_max=1024))
    with pytest.raises(RemoteProtocolError, match="frame_bytes_max"):
        server.receive_data((1025).to_bytes(4, "big"))
