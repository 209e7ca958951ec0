"""Histories and checkers: hand-made histories with one known anomaly each, and a
property that serial executions never produce a false positive."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txrpc.testing._checkers import (
    CheckResult,
    check_bank,
    check_idempotency,
    check_list_append,
    check_replica_consistency,
    check_termination,
)
from txrpc.testing._history import History, Op

# -- helpers -----------------------------------------------------------------------------


class Recorder:
    """Builds histories by hand: each call is one operation, invoked and completed."""

    def __init__(self) -> None:
        self.history = History()
        self.clock = 0.0

    def now(self) -> float:
        self.clock += 1.0
        return self.clock

    def op(self, f: str, value: Any, type: str = "ok", result: Any = ..., process: int = 0) -> Op:
        handle = self.history.invoke(process, f, value, self.now())
        return self.history.complete(handle, type, value if result is ... else result, self.now())  # type: ignore[arg-type]

    def txn(self, *mops: list[Any], type: str = "ok") -> int:
        """A list-append transaction; reads carry their observed value. Returns its id
        (the completion's index). fail/info invocations get reads of None."""
        invoke_value = [[m[0], m[1], None] if m[0] == "r" else list(m) for m in mops]
        result = [list(m) for m in mops] if type == "ok" else invoke_value
        return self.op("txn", invoke_value, type, result).index


def append(key: str, element: int) -> list[Any]:
    return ["append", key, element]


def read(key: str, value: list[int] | None) -> list[Any]:
    return ["r", key, value]


def types(result: CheckResult) -> set[str]:
    return set(result.anomaly_types)


# -- history -----------------------------------------------------------------------------


def test_history_pairs_invocations_with_completions_by_process() -> None:
    h = History()
    a = h.invoke(1, "read", None, 0.0)
    b = h.invoke(2, "transfer", {"from": "a", "to": "b", "amount": 1}, 0.5)
    h.complete(b, "fail", None, 1.0)
    h.complete(a, "ok", {"a": 1}, 2.0)
    c = h.invoke(2, "read", None, 3.0)
    pairs = h.pairs()
    assert [(i.index, d.index if d else None) for i, d in pairs] == [(0, 3), (1, 2), (4, None)]
    assert pairs[0][1] is not None and pairs[0][1].value == {"a": 1}
    assert h.outstanding == (c,)
    assert [op.type for op in h] == ["invoke", "invoke", "fail", "ok", "invoke"]


def test_history_rejects_misuse() -> None:
    h = History()
    a = h.invoke(1, "read", None, 0.0)
    with pytest.raises(ValueError, match="outstanding"):
        h.invoke(1, "read", None, 1.0)
    h.complete(a, "ok", {}, 1.0)
    with pytest.raises(ValueError, match="not an outstanding"):
        h.complete(a, "ok", {}, 2.0)
    with pytest.raises(ValueError, match="without an outstanding"):
        History([Op(0, 1, "ok", "read", {}, 0.0)])
    with pytest.raises(ValueError, match="out of sequence"):
        History([Op(1, 1, "invoke", "read", None, 0.0)])


def test_operation_context_manager() -> None:
    h = History()
    ticks = iter(range(100))

    def clock() -> float:
        return float(next(ticks))

    with h.operation(1, "txn", [["r", "x", None]], clock=clock) as op:
        op.ok([["r", "x", [1]]])
    with h.operation(1, "txn", [["append", "x", 2]], clock=clock):
        pass  # a normal exit is ok, with the invoke's value
    with h.operation(2, "transfer", {"amount": 1}, clock=clock) as op:
        op.fail("insufficient funds")
    with pytest.raises(TimeoutError), h.operation(3, "read", None, clock=clock):
        raise TimeoutError  # an exception: the outcome is unknown
    done = [(d.process, d.type, d.value, d.time) for _, d in h.pairs() if d is not None]
    assert done == [
        (1, "ok", [["r", "x", [1]]], 1.0),
        (1, "ok", [["append", "x", 2]], 3.0),
        (2, "fail", "insufficient funds", 5.0),
        (3, "info", None, 7.0),
    ]
    with pytest.raises(ValueError, match="already completed"), h.operation(4, "read", None, clock=clock) as op:
        op.ok({})
        op.fail()


def test_json_lines_round_trip(tmp_path: Path) -> None:
    r = Recorder()
    r.txn(append("x", 1), read("y", [2, 3]))
    r.op("transfer", {"from": "a", "to": "b", "amount": 5}, "info", process=7)
    r.op("read", None, "ok", {"a": 10, "b": -2.5}, process=3)
    r.history.invoke(4, "read", None, 99.25)  # still outstanding
    path = tmp_path / "history.jsonl"
    r.history.dump(path)
    loaded = History.load(path)
    assert loaded == r.history
    assert loaded.pairs() == r.history.pairs()
    assert loaded.to_jsonl() == path.read_text(encoding="utf-8")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(r.history) == 7
    assert json.loads(lines[0]) == {"f": "txn", "index": 0, "process": 0, "time": 1.0, "type": "invoke",
                                    "value": [["append", "x", 1], ["r", "y", None]]}
    assert check_list_append(loaded).valid == check_list_append(r.history).valid


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"index": 0, "process": 1, "type": "invoke", "f": "r", "value": null}\n', "missing"),
        ('{"index": 0, "process": 1, "type": "begin", "f": "r", "value": null, "time": 0}\n', "type"),
        ('{"index": 0, "process": "p", "type": "invoke", "f": "r", "value": null, "time": 0}\n', "integers"),
        ("[1, 2]\n", "JSON object"),
        ("{oops\n", "line 1"),
    ],
)
def test_load_rejects_malformed_lines(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        History.from_jsonl(text)


# -- list append: hand-made anomalies ----------------------------------------------------


def test_serial_list_append_history_is_valid() -> None:
    r = Recorder()
    r.txn(append("x", 1), append("y", 1))
    r.txn(read("x", [1]), append("x", 2), read("x", [1, 2]))
    r.txn(append("y", 2), type="fail")
    r.txn(append("y", 3), type="info")  # it may have committed: it did
    r.txn(read("x", [1, 2]), read("y", [1, 3]), read("z", None))
    result = check_list_append(r.history)
    assert result.valid, str(result)
    assert result.anomalies == []
    assert result.counts["ok"] == 3 and result.counts["fail"] == 1 and result.counts["info"] == 1
    assert result.counts["edges"] > 0
    assert "valid" in result.summary()


def test_g0_write_cycle() -> None:
    r = Recorder()
    t1 = r.txn(append("x", 1), append("y", 1))
    t2 = r.txn(append("x", 2), append("y", 2))
    r.txn(read("x", [1, 2]), read("y", [2, 1]))  # x: T1 before T2, y: T2 before T1
    result = check_list_append(r.history)
    assert types(result) == {"G0"}
    (g0,) = result.anomalies
    assert sorted(g0["txns"]) == sorted([t1, t2])
    assert {e["type"] for e in g0["edges"]} == {"ww"}
    assert {(e["from"], e["to"], e["key"]) for e in g0["edges"]} == {(t1, t2, "x"), (t2, t1, "y")}
    assert not result.valid


def test_g1a_aborted_read() -> None:
    r = Recorder()
    t1 = r.txn(append("x", 1), type="fail")
    t2 = r.txn(read("x", [1]))
    result = check_list_append(r.history)
    assert types(result) == {"G1a"}
    assert result.anomalies[0]["txn"] == t2 and result.anomalies[0]["writers"] == [t1]


def test_info_transaction_may_have_committed() -> None:
    r = Recorder()
    r.txn(append("x", 1), type="info")
    r.txn(read("x", [1]))
    assert check_list_append(r.history).valid
    r.history.invoke(5, "txn", [append("y", 1)], 100.0)  # never completed: info too
    r.txn(read("y", [1]))
    assert check_list_append(r.history).valid


def test_g1b_intermediate_read() -> None:
    r = Recorder()
    t1 = r.txn(append("x", 1), append("x", 2))
    t2 = r.txn(read("x", [1]))
    result = check_list_append(r.history)
    assert types(result) == {"G1b"}
    assert result.anomalies[0]["txn"] == t2 and result.anomalies[0]["writer"] == t1


def test_g1c_circular_information_flow() -> None:
    r = Recorder()
    t1 = r.txn(append("x", 1), read("y", [1]))
    t2 = r.txn(append("y", 1), read("x", [1]))
    result = check_list_append(r.history)
    assert types(result) == {"G1c"}
    (g1c,) = result.anomalies
    assert sorted(g1c["txns"]) == sorted([t1, t2])
    assert {e["type"] for e in g1c["edges"]} == {"wr"}


def test_g_single_read_skew() -> None:
    r = Recorder()
    t1 = r.txn(append("x", 1), append("y", 1))
    t2 = r.txn(read("x", []), read("y", [1]))  # sees T1's y but not its x
    r.txn(read("x", [1]))
    result = check_list_append(r.history)
    assert types(result) == {"G-single"}
    (anomaly,) = result.anomalies
    assert sorted(anomaly["txns"]) == sorted([t1, t2])
    assert sorted(e["type"] for e in anomaly["edges"]) == ["rw", "wr"]
    assert "G2" not in types(result)


def test_g2_write_skew() -> None:
    r = Recorder()
    t1 = r.txn(read("x", []), append("y", 1))
    t2 = r.txn(read("y", []), append("x", 1))
    r.txn(read("x", [1]), read("y", [1]))
    result = check_list_append(r.history)
    assert types(result) == {"G2"}
    (anomaly,) = result.anomalies
    assert sorted(anomaly["txns"]) == sorted([t1, t2])
    assert [e["type"] for e in anomaly["edges"]] == ["rw", "rw"]
    assert "G-single" not in types(result)


def test_incompatible_order() -> None:
    r = Recorder()
    r.txn(append("x", 1))
    r.txn(append("x", 2))
    t3 = r.txn(read("x", [1, 2]))
    t4 = r.txn(read("x", [2]))
    result = check_list_append(r.history)
    assert types(result) == {"incompatible-order"}
    assert [read["txn"] for read in result.anomalies[0]["reads"]] == [t3, t4]


def test_garbage_read() -> None:
    r = Recorder()
    r.txn(append("x", 1))
    r.txn(read("x", [1, 99]))
    result = check_list_append(r.history)
    assert types(result) == {"garbage-read"}
    assert result.anomalies[0]["elements"] == [99]


def test_duplicate_elements() -> None:
    r = Recorder()
    r.txn(append("x", 1))
    r.txn(append("x", 2))
    r.txn(read("x", [1, 2, 1]))  # e.g. a retried, non-idempotent append
    result = check_list_append(r.history)
    assert types(result) == {"duplicate-elements"}
    assert result.anomalies[0]["elements"] == [1]


def test_internal_inconsistency() -> None:
    r = Recorder()
    r.txn(append("x", 1))
    r.txn(append("x", 2), read("x", [1]))  # does not see its own append
    r.txn(read("x", [1]), read("x", []))  # non-repeatable read
    result = check_list_append(r.history)
    assert types(result) == {"internal"}
    assert len(result.anomalies) == 2


def test_an_anomaly_explains_itself() -> None:
    r = Recorder()
    r.txn(read("x", []), append("y", 1))
    r.txn(read("y", []), append("x", 1))
    r.txn(read("x", [1]), read("y", [1]))
    result = check_list_append(r.history)
    text = str(result)
    assert text.startswith("list-append: INVALID")
    assert "G2×1" in text and "-rw('x')->" in text and "-rw('y')->" in text
    assert result.row()[:2] == ("list-append", "INVALID")
    json.dumps(result.to_json())  # JSON-friendly


def test_list_append_rejects_reused_elements_and_malformed_ops() -> None:
    r = Recorder()
    r.txn(append("x", 1))
    r.txn(append("x", 1))
    with pytest.raises(ValueError, match="unique per key"):
        check_list_append(r.history)
    r = Recorder()
    r.op("txn", [["write", "x", 1]])
    with pytest.raises(ValueError, match="micro-ops"):
        check_list_append(r.history)


def test_list_append_says_how_to_get_networkx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "networkx", None)  # makes `import networkx` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'txrpc\[testing\]'"):
        check_list_append(History())


# -- list append: no false positives on serial executions --------------------------------

KEYS = ["x", "y", 0]

txn_shapes = st.lists(
    st.lists(st.tuples(st.sampled_from(["append", "r"]), st.sampled_from(KEYS)), min_size=1, max_size=4),
    max_size=25,
)
outcomes = st.lists(st.sampled_from(["ok", "ok", "ok", "fail", "info-applied", "info-lost", "open"]), max_size=25)


@settings(max_examples=300, deadline=None)
@given(txn_shapes, outcomes, st.integers(min_value=1, max_value=4))
def test_serial_executions_are_always_valid(shapes: list[list[tuple[str, Any]]], fates: list[str],
                                            processes: int) -> None:
    state: dict[Any, list[int]] = {}
    next_element: dict[Any, int] = {}
    h = History()
    time = 0.0
    for i, shape in enumerate(shapes):
        fate = fates[i] if i < len(fates) else "ok"
        invoke_value: list[list[Any]] = []
        for kind, key in shape:
            if kind == "append":
                next_element[key] = next_element.get(key, 0) + 1
                invoke_value.append(["append", key, next_element[key]])
            else:
                invoke_value.append(["r", key, None])
        # Execute serially against a copy; commit unless the transaction failed.
        scratch = {k: list(v) for k, v in state.items()}
        result: list[list[Any]] = []
        for kind, key, arg in invoke_value:
            if kind == "append":
                scratch.setdefault(key, []).append(arg)
                result.append([kind, key, arg])
            else:
                result.append([kind, key, list(scratch[key]) if key in scratch else None])
        if fate in ("ok", "info-applied"):
            state = scratch
        process = processes + i if fate == "open" else i % processes
        handle = h.invoke(process, "txn", invoke_value, time)
        time += 0.5
        if fate == "ok":
            h.complete(handle, "ok", result, time)
        elif fate == "fail":
            h.complete(handle, "fail", invoke_value, time)
        elif fate != "open":
            h.complete(handle, "info", None, time)
    # A final read of every key makes every committed append visible.
    final = [["r", key, list(state[key]) if key in state else None] for key in KEYS]
    h.complete(h.invoke(processes + len(shapes), "txn", [["r", k, None] for k in KEYS], time), "ok", final, time)
    result_ = check_list_append(h)
    assert result_.valid, str(result_)
    assert check_list_append(History.from_jsonl(h.to_jsonl())).valid


# -- bank --------------------------------------------------------------------------------

ACCOUNTS = ["a", "b", "c"]


def bank_history(*reads: dict[Any, Any]) -> History:
    r = Recorder()
    r.op("transfer", {"from": "a", "to": "b", "amount": 3})
    r.op("transfer", {"from": "b", "to": "c", "amount": 50}, "fail")
    r.op("read", None, "fail", None)
    r.op("read", None, "info", None)
    for value in reads:
        r.op("read", None, "ok", value)
    return r.history


def test_bank_conserved_is_valid() -> None:
    result = check_bank(bank_history({"a": 10, "b": 10, "c": 10}, {"a": 7, "b": 13, "c": 10}), accounts=ACCOUNTS,
                        total=30)
    assert result.valid, str(result)
    assert result.counts["ok"] == 3 and result.counts["fail"] == 2 and result.counts["info"] == 1
    assert result.counts["reads-ok"] == 2


def test_bank_reads_that_do_not_conserve_money() -> None:
    result = check_bank(bank_history({"a": 10, "b": 10, "c": 10}, {"a": 7, "b": 10, "c": 10}), accounts=ACCOUNTS,
                        total=30)
    assert types(result) == {"wrong-total"}
    assert result.anomalies[0]["total"] == 27


def test_bank_negative_balance() -> None:
    result = check_bank(bank_history({"a": -5, "b": 25, "c": 10}), accounts=ACCOUNTS, total=30)
    assert types(result) == {"negative-balance"}
    assert result.anomalies[0]["balances"] == {"a": -5}


def test_bank_missing_account_and_integer_accounts_after_json() -> None:
    result = check_bank(bank_history({"a": 15, "b": 15}), accounts=ACCOUNTS, total=30)
    assert types(result) == {"wrong-accounts"}
    h = bank_history({0: 20, 1: 10})
    assert check_bank(History.from_jsonl(h.to_jsonl()), accounts=[0, 1], total=30).valid  # keys became "0", "1"


# -- idempotency, termination, replicas --------------------------------------------------


def test_idempotency_once_is_valid_twice_is_flagged() -> None:
    h = History()
    h.record(100, "execute", {"key": "k1"}, 1.0)
    h.record(100, "execute", {"key": "k2"}, 2.0)
    h.record(100, "execute", {"key": "k1", "identity": "bob"}, 3.0)  # another identity's k1
    h.complete(h.invoke(1, "execute", {"key": "k2"}, 4.0), "fail", {"key": "k2"}, 5.0)  # not an execution
    assert check_idempotency(h).valid
    again = h.record(101, "execute", {"key": "k2"}, 6.0)
    result = check_idempotency(h)
    assert types(result) == {"duplicate-execution"}
    assert result.anomalies[0]["key"] == "k2" and result.anomalies[0]["ops"] == [3, again.index]
    assert result.counts == {"executions": 4, "keys": 3, "duplicated": 1}


def test_termination() -> None:
    stuck = {"tx-2": "prepared", "tx-1": "preparing"}
    assert check_termination({}, faults_stopped_at=10.0, deadline_s=5.0, now=100.0).valid
    assert check_termination(stuck, faults_stopped_at=10.0, deadline_s=5.0, now=14.9).valid  # too early to tell
    result = check_termination(stuck, faults_stopped_at=10.0, deadline_s=5.0, now=15.0)
    assert not result.valid
    assert [(a["type"], a["txid"], a["state"]) for a in result.anomalies] == [
        ("in-doubt", "tx-1", "preparing"),
        ("in-doubt", "tx-2", "prepared"),
    ]
    assert "5s after faults stopped" in result.anomalies[0]["explanation"]


def test_replica_consistency() -> None:
    assert check_replica_consistency({1: {"r1": b"\x01", "r2": b"\x01"}, 2: {"r1": b"\x02", "r2": b"\x02"}}).valid
    result = check_replica_consistency({1: {"r1": b"\x01", "r2": b"\x01"}, 2: {"r1": b"\x02", "r2": b"\x03",
                                                                                "r3": b"\x02"}})
    assert types(result) == {"divergent-replicas"}
    (anomaly,) = result.anomalies
    assert anomaly["epoch"] == 2
    assert anomaly["groups"] == [{"digest": "02", "replicas": ["r1", "r3"]}, {"digest": "03", "replicas": ["r2"]}]
