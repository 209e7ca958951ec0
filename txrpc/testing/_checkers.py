"""Checkers: read a :class:`~txrpc.testing._history.History` (or other evidence) and say
whether it is consistent, and if not, why, as a :class:`CheckResult`.

===========================  ===========================================================
:func:`check_bank`           money is conserved and never negative in any ``ok`` read
:func:`check_list_append`    Elle-style list-append: G0, G1a, G1b, G1c, G-single, G2, ...
:func:`check_idempotency`    no idempotency key was executed more than once
:func:`check_termination`    no transaction is still in doubt after faults stop + deadline
:func:`check_replica_consistency`  replicas agree within each epoch
===========================  ===========================================================

History conventions (``f``, ``value``) are in each checker's docstring. An invocation
never completed counts as ``info``: it may or may not have taken effect.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from ._history import History, Op, OpType

__all__ = [
    "Anomaly",
    "CheckResult",
    "check_bank",
    "check_idempotency",
    "check_list_append",
    "check_replica_consistency",
    "check_termination",
]

Anomaly: TypeAlias = dict[str, Any]
"""One finding: always has ``"type"`` and a human-readable ``"explanation"``; the other
keys depend on the type (op indices, keys, edges, ...)."""

_NETWORKX_MISSING: Final = "check_list_append needs networkx: pip install 'txrpc[testing]'"
_RW_TRIES_PER_SCC: Final = 1000  # rw edges tried as the single rw edge of a G-single cycle


@dataclass(slots=True)
class CheckResult:
    """A checker's verdict: ``valid`` iff ``anomalies`` is empty."""

    valid: bool
    name: str
    anomalies: list[Anomaly] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def anomaly_types(self) -> list[str]:
        """The distinct anomaly types found, in order of first appearance."""
        return list(dict.fromkeys(str(a["type"]) for a in self.anomalies))

    def anomaly_counts(self) -> dict[str, int]:
        """How many anomalies of each type were found."""
        return dict(Counter(str(a["type"]) for a in self.anomalies))

    def row(self) -> tuple[str, str, str, str]:
        """``(name, "valid" | "INVALID", counts, anomalies)`` as strings, for a table."""
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items()) or "-"
        anomalies = " ".join(f"{t}×{n}" for t, n in self.anomaly_counts().items()) or "-"
        return self.name, "valid" if self.valid else "INVALID", counts, anomalies

    def summary(self) -> str:
        """One line: name, verdict, counts and anomaly tallies."""
        name, verdict, counts, anomalies = self.row()
        line = f"{name}: {verdict} ({counts})"
        return line if self.valid else f"{line}: {anomalies}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "valid": self.valid, "counts": dict(self.counts), "anomalies": list(self.anomalies)}

    def __str__(self) -> str:
        return "\n".join([self.summary(), *(f"  {a['type']}: {a['explanation']}" for a in self.anomalies)])


def _result(name: str, anomalies: list[Anomaly], counts: Mapping[str, int]) -> CheckResult:
    return CheckResult(valid=not anomalies, name=name, anomalies=anomalies, counts=dict(counts))


def _history(history: History | Iterable[Op]) -> History:
    return history if isinstance(history, History) else History(history)


def _outcomes(history: History) -> list[tuple[Op, Op | None, OpType]]:
    """(invoke, completion, outcome): an outstanding invocation's outcome is ``info``."""
    return [(inv, done, done.type if done is not None else "info") for inv, done in history.pairs()]


def _sorted(items: Iterable[Any]) -> list[Any]:
    items = list(items)
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)


def _show(x: Any) -> Any:
    """A JSON-friendly, readable form of a digest or identifier."""
    return x.hex() if isinstance(x, bytes | bytearray) else x


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# -- bank --------------------------------------------------------------------------------


def check_bank(history: History | Iterable[Op], *, accounts: Collection[Hashable], total: float) -> CheckResult:
    """Bank workload: transfers move money between ``accounts``; reads see it all.

    Ops: ``f="transfer"``, value ``{"from": a, "to": b, "amount": n}``;
    ``f="read"``, whose ``ok`` value is ``{account: balance}`` for every account.
    Valid iff every ``ok`` read has exactly ``accounts``, sums to ``total`` and has no
    negative balance. Reads that did not end ``ok`` are ignored; transfers are only
    counted. Accounts are compared by ``str()`` (JSON makes map keys strings).
    """
    h = _history(history)
    names = {str(a) for a in accounts}
    counts: Counter[str] = Counter()
    anomalies: list[Anomaly] = []
    for invoke, done, outcome in _outcomes(h):
        if invoke.f not in ("transfer", "read"):
            continue
        counts[outcome] += 1
        counts[f"{invoke.f}s-{outcome}"] += 1
        if invoke.f != "read" or done is None or outcome != "ok":
            continue
        read, at = done.value, done.index
        if not isinstance(read, Mapping) or not all(_is_number(v) for v in read.values()):
            anomalies.append({"type": "malformed-read", "op": at, "value": read,
                              "explanation": f"read {at} is not a map of account to balance: {read!r}"})
            continue
        balances = {str(k): v for k, v in read.items()}
        if balances.keys() != names:
            missing, unexpected = sorted(names - balances.keys()), sorted(balances.keys() - names)
            anomalies.append({"type": "wrong-accounts", "op": at, "missing": missing, "unexpected": unexpected,
                              "explanation": f"read {at} lacks accounts {missing} / has unknown accounts {unexpected}"})
        observed = sum(balances.values())
        if observed != total:
            anomalies.append({"type": "wrong-total", "op": at, "total": observed, "expected": total, "value": read,
                              "explanation": f"read {at} sums to {observed}, not {total}: {read!r}"})
        negative = {k: v for k, v in balances.items() if v < 0}
        if negative:
            anomalies.append({"type": "negative-balance", "op": at, "balances": negative,
                              "explanation": f"read {at} has negative balances {negative!r}"})
    return _result("bank", anomalies, {k: counts[k] for k in ("ok", "fail", "info")} | dict(sorted(counts.items())))


# -- idempotency -------------------------------------------------------------------------


def check_idempotency(history: History | Iterable[Op]) -> CheckResult:
    """No request executed twice.

    Convention: the *service* records each actual execution of a request's body as an
    ``ok`` op with ``f="execute"`` and value ``{"key": idempotency_key}`` (for example
    with :meth:`History.record` on a process id reserved for the server), optionally
    with an ``"identity"`` entry: keys are scoped by identity, as in the request log.
    Valid iff no (identity, key) has more than one execution. Other ops are ignored.
    """
    h = _history(history)
    executions: dict[tuple[Any, Any], list[int]] = {}
    for op in h:
        if op.type != "ok" or op.f != "execute":
            continue
        if not isinstance(op.value, Mapping) or "key" not in op.value:
            raise ValueError(f'an execute op\'s value must be {{"key": ...}}: {op}')
        executions.setdefault((op.value.get("identity"), op.value["key"]), []).append(op.index)
    anomalies: list[Anomaly] = []
    for (identity, key), at in executions.items():
        if len(at) > 1:
            who = "" if identity is None else f" of identity {identity!r}"
            anomalies.append({"type": "duplicate-execution", "key": key, "identity": identity, "ops": at,
                              "explanation": f"idempotency key {key!r}{who} executed {len(at)} times (ops {at})"})
    counts = {"executions": sum(map(len, executions.values())), "keys": len(executions), "duplicated": len(anomalies)}
    return _result("idempotency", anomalies, counts)


# -- termination -------------------------------------------------------------------------


def check_termination(
    in_doubt: Mapping[Any, Any], *, faults_stopped_at: float, deadline_s: float, now: float
) -> CheckResult:
    """Every transaction is decided within ``deadline_s`` of the faults stopping.

    ``in_doubt`` maps each transaction id still undecided somewhere at time ``now`` to
    its state there (e.g. ``"prepared"``). Valid iff it is empty or ``now`` is earlier
    than ``faults_stopped_at + deadline_s`` (too early to tell).
    """
    due = faults_stopped_at + deadline_s
    anomalies: list[Anomaly] = []
    if now >= due:
        for txid in _sorted(in_doubt):
            state = in_doubt[txid]
            anomalies.append({"type": "in-doubt", "txid": _show(txid), "state": state,
                              "explanation": f"transaction {_show(txid)!r} still {state} at t={now:g}, "
                                             f"{now - faults_stopped_at:g}s after faults stopped "
                                             f"(deadline {deadline_s:g}s)"})
    return _result("termination", anomalies, {"in_doubt": len(in_doubt), "judged": int(now >= due)})


# -- replicas ----------------------------------------------------------------------------


def check_replica_consistency(digests: Mapping[Any, Mapping[str, Any]]) -> CheckResult:
    """Replicas agree: ``digests`` maps an epoch to ``{replica name: state digest}``;
    valid iff within each epoch every replica has the same digest."""
    anomalies: list[Anomaly] = []
    for epoch in _sorted(digests):
        groups: dict[Any, list[str]] = {}
        for replica in _sorted(digests[epoch]):
            groups.setdefault(_show(digests[epoch][replica]), []).append(replica)
        if len(groups) > 1:
            shown = "; ".join(f"{', '.join(names)}: {digest!r}" for digest, names in groups.items())
            anomalies.append({"type": "divergent-replicas", "epoch": epoch,
                              "groups": [{"digest": d, "replicas": r} for d, r in groups.items()],
                              "explanation": f"epoch {epoch!r}: replicas disagree ({shown})"})
    counts = {"epochs": len(digests), "replicas": len({r for e in digests.values() for r in e})}
    return _result("replica-consistency", anomalies, counts)


# -- list append -------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Txn:
    id: int  # the index of its completion op, or of its invocation if never completed
    outcome: OpType
    mops: list[tuple[str, Any, Any]]


@dataclass(slots=True, frozen=True)
class _Write:
    txn: _Txn
    final: bool  # the txn's last append to this key


@dataclass(slots=True, frozen=True)
class _Read:
    txn: _Txn
    key: Any
    value: tuple[Any, ...]
    external: bool  # before the txn's own appends to the key: it shows the state others left


_CYCLE_DESCRIPTIONS: Final = {
    "G0": "write cycle: transactions' appends are ordered in a cycle (ww edges only)",
    "G1c": "circular information flow: a cycle of ww and wr dependencies",
    "G-single": "read skew: a dependency cycle with exactly one anti-dependency (rw)",
    "G2": "anti-dependency cycle: a dependency cycle with {n} anti-dependencies (rw)",
}


def check_list_append(history: History | Iterable[Op]) -> CheckResult:
    """Elle-style checker for the list-append workload (Kingsbury & Alvaro, VLDB 2020).

    Ops: ``f="txn"``, value a list of micro-ops ``["append", key, element]`` and
    ``["r", key, None]``; the ``ok`` completion's value is the same list with each read's
    ``None`` replaced by the list the key held (an ``ok`` read of ``None`` means empty).
    Elements are unique per key across the whole history (``ValueError`` otherwise).
    Anomalies name a transaction ``T<n>`` by the index of its completion op (of its
    invocation if it never completed).

    Each key's version order is the longest ``ok`` read of it; every other read must be
    a prefix of it (else ``incompatible-order``, and the key yields no ww/rw edges).
    Committed transactions (``ok``, and ``info`` ones, which may have committed) are
    linked by ww (an append directly follows another's in the version order), wr (a
    read's last element is another's append) and rw (a read lacks the next element,
    another's append) edges, using only a transaction's reads of a key made before its
    own appends to it. Reported anomalies:

    * ``G0``, ``G1c``, ``G-single``, ``G2``: a cycle of ww edges / ww+wr edges with at
      least one wr / exactly one rw edge / two or more rw edges, found per strongly
      connected component (one cycle per class and component), with its edges;
    * ``G1a``: an ``ok`` read saw an append of a ``fail``ed transaction;
    * ``G1b``: an ``ok`` read ended with an append that was not its transaction's last
      append to the key;
    * ``internal``: a read disagrees with its own transaction's earlier reads and
      appends of that key;
    * ``incompatible-order``, ``duplicate-elements`` (a read lists an element twice),
      ``garbage-read`` (a read lists an element nobody appended).
    """
    try:
        import networkx as nx
    except ImportError as exc:  # networkx is a testing extra
        raise ImportError(_NETWORKX_MISSING) from exc

    h = _history(history)
    txns = [_parse_txn(invoke, done, outcome) for invoke, done, outcome in _outcomes(h) if invoke.f == "txn"]
    anomalies: list[Anomaly] = []

    writers: dict[Any, dict[Any, _Write]] = {}
    for txn in txns:
        appends: dict[Any, list[Any]] = {}
        for kind, key, element in txn.mops:
            if kind == "append":
                appends.setdefault(key, []).append(element)
        for key, elements in appends.items():
            by_element = writers.setdefault(key, {})
            for i, element in enumerate(elements):
                if element in by_element:
                    raise ValueError(f"element {element!r} appended to key {key!r} twice "
                                     f"(T{by_element[element].txn.id} and T{txn.id}): elements must be unique per key")
                by_element[element] = _Write(txn, i == len(elements) - 1)

    reads = [read for txn in txns if txn.outcome == "ok" for read in _reads(txn, anomalies)]
    unordered: set[Any] = set()  # keys whose version order cannot be trusted
    for read in reads:
        unordered |= _check_read(read, writers.get(read.key, {}), anomalies)
    orders = _version_orders(reads, unordered, anomalies)

    # The dependency graph over transactions that may have committed.
    edges: dict[tuple[int, int], dict[str, Anomaly]] = {}

    def writer(key: Any, element: Any) -> _Txn | None:
        w = writers.get(key, {}).get(element)
        return w.txn if w is not None and w.txn.outcome != "fail" else None

    def edge(a: _Txn, b: _Txn, label: str, key: Any, explanation: str) -> None:
        if a is not b:
            edges.setdefault((a.id, b.id), {}).setdefault(
                label, {"from": a.id, "to": b.id, "type": label, "key": key, "explanation": explanation})

    for key, order in orders.items():
        for x, y in itertools.pairwise(order):
            wx, wy = writer(key, x), writer(key, y)
            if wx is not None and wy is not None:
                edge(wx, wy, "ww", key, f"T{wy.id} appended {y!r} to {key!r} right after T{wx.id}'s {x!r}")
    for read in reads:
        if not read.external:
            continue
        if read.value and (w := writer(read.key, read.value[-1])) is not None:
            edge(w, read.txn, "wr", read.key, f"T{read.txn.id} read {read.key!r} = {list(read.value)!r}, "
                                              f"ending with T{w.id}'s append")
        version = orders.get(read.key)
        if version is None or len(read.value) >= len(version):
            continue
        if (w := writer(read.key, version[len(read.value)])) is not None:
            edge(read.txn, w, "rw", read.key, f"T{read.txn.id} read {read.key!r} = {list(read.value)!r}, "
                                              f"missing T{w.id}'s next append {version[len(read.value)]!r}")

    anomalies.extend(_cycles(nx, edges))
    counts = Counter(t.outcome for t in txns)
    return _result("list-append", anomalies, {"ok": counts["ok"], "fail": counts["fail"], "info": counts["info"],
                                              "keys": len(writers), "edges": sum(map(len, edges.values()))})


def _parse_txn(invoke: Op, done: Op | None, outcome: OpType) -> _Txn:
    value = done.value if done is not None and outcome == "ok" else invoke.value
    where = done if done is not None else invoke
    if not isinstance(value, list | tuple):
        raise ValueError(f"a txn's value must be a list of micro-ops: {where}")
    mops: list[tuple[str, Any, Any]] = []
    for mop in value:
        if not isinstance(mop, list | tuple) or len(mop) != 3 or mop[0] not in ("append", "r"):
            raise ValueError(f'micro-ops must be ["append", key, element] or ["r", key, value]: {mop!r} in {where}')
        kind, key, arg = mop
        if not isinstance(key, Hashable) or (kind == "append" and not isinstance(arg, Hashable)):
            raise ValueError(f"keys and elements must be hashable: {mop!r} in {where}")
        if kind == "r" and outcome == "ok":
            if arg is None:
                arg = ()
            elif not isinstance(arg, list | tuple) or not all(isinstance(e, Hashable) for e in arg):
                raise ValueError(f"an ok read's value must be a list of elements or null: {mop!r} in {where}")
            arg = tuple(arg)
        mops.append((kind, key, arg))
    return _Txn(where.index, outcome, mops)


def _reads(txn: _Txn, anomalies: list[Anomaly]) -> list[_Read]:
    """The reads of an ``ok`` transaction; flags reads inconsistent with its own ops."""
    result: list[_Read] = []
    seen: dict[Any, tuple[Any, ...]] = {}  # key -> what the txn last read of it
    own: dict[Any, list[Any]] = {}  # key -> the txn's appends to it since that read
    for kind, key, arg in txn.mops:
        if kind == "append":
            own.setdefault(key, []).append(arg)
            continue
        mine = tuple(own.get(key, ()))
        result.append(_Read(txn, key, arg, external=not mine and key not in seen))
        if key in seen:
            expected: tuple[Any, ...] | None = seen[key] + mine
            ok = arg == expected
        else:
            expected = None
            ok = arg[len(arg) - len(mine):] == mine if len(arg) >= len(mine) else False
        if not ok:
            what = f"{list(expected)!r}" if expected is not None else f"a list ending with {list(mine)!r}"
            anomalies.append({"type": "internal", "txn": txn.id, "key": key, "value": list(arg),
                              "explanation": f"T{txn.id} read {key!r} = {list(arg)!r}, but its own earlier "
                                             f"reads and appends imply {what}"})
        seen[key], own[key] = arg, []
    return result


def _check_read(read: _Read, writers: Mapping[Any, _Write], anomalies: list[Anomaly]) -> set[Any]:
    """Flags duplicate, garbage, aborted (G1a) and intermediate (G1b) reads; returns
    ``{key}`` if the read makes the key's version order untrustworthy."""
    t, key, value = read.txn.id, read.key, read.value
    shown = f"T{t} read {key!r} = {list(value)!r}"
    untrusted: set[Any] = set()
    duplicates = [e for e, n in Counter(value).items() if n > 1]
    if duplicates:
        untrusted.add(key)
        anomalies.append({"type": "duplicate-elements", "txn": t, "key": key, "elements": duplicates,
                          "explanation": f"{shown}, which lists {duplicates!r} more than once"})
    garbage = [e for e in value if e not in writers]
    if garbage:
        anomalies.append({"type": "garbage-read", "txn": t, "key": key, "elements": garbage,
                          "explanation": f"{shown}, but nobody appended {garbage!r}"})
    aborted = {e: writers[e].txn.id for e in value if e in writers and writers[e].txn.outcome == "fail"}
    if aborted:
        anomalies.append({"type": "G1a", "txn": t, "key": key, "elements": list(aborted),
                          "writers": _sorted(set(aborted.values())),
                          "explanation": f"{shown}, seeing appends of failed transactions: "
                                         + ", ".join(f"{e!r} by T{w}" for e, w in aborted.items())})
    last = writers.get(value[-1]) if value else None
    if last is not None and last.txn is not read.txn and not last.final:
        anomalies.append({"type": "G1b", "txn": t, "key": key, "writer": last.txn.id, "element": value[-1],
                          "explanation": f"{shown}, ending with {value[-1]!r}, an intermediate append of "
                                         f"T{last.txn.id}, which appended to {key!r} again afterwards"})
    return untrusted


def _version_orders(reads: list[_Read], untrusted: set[Any], anomalies: list[Anomaly]) -> dict[Any, tuple[Any, ...]]:
    """Each key's version order: its first longest read, if every read is a prefix of it."""
    by_key: dict[Any, list[_Read]] = {}
    for read in reads:
        by_key.setdefault(read.key, []).append(read)
    orders: dict[Any, tuple[Any, ...]] = {}
    for key, key_reads in by_key.items():
        longest = max(key_reads, key=lambda r: len(r.value))  # the first of the longest
        clash = next((r for r in key_reads if longest.value[: len(r.value)] != r.value), None)
        if clash is not None:
            anomalies.append({"type": "incompatible-order", "key": key,
                              "reads": [{"txn": r.txn.id, "value": list(r.value)} for r in (longest, clash)],
                              "explanation": f"T{longest.txn.id} read {key!r} = {list(longest.value)!r} but "
                                             f"T{clash.txn.id} read {list(clash.value)!r}, not a prefix of it"})
        elif key not in untrusted:
            orders[key] = longest.value
    return orders


def _cycles(nx: Any, edges: Mapping[tuple[int, int], Mapping[str, Anomaly]]) -> list[Anomaly]:
    """One cycle per anomaly class per strongly connected component, weakest class first."""
    full, ww, wwr = nx.DiGraph(), nx.DiGraph(), nx.DiGraph()
    for (a, b), labels in edges.items():
        full.add_edge(a, b)
        if "ww" in labels:
            ww.add_edge(a, b)
        if "ww" in labels or "wr" in labels:
            wwr.add_edge(a, b)

    found: list[Anomaly] = []
    seen: set[tuple[str, tuple[int, ...]]] = set()

    def report(nodes: list[int]) -> str:
        """Reports the cycle nodes[0] -> nodes[1] -> ... -> nodes[0]; returns its class."""
        chosen = []
        for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True):
            labels = edges[(a, b)]
            chosen.append(labels[next(lb for lb in ("ww", "wr", "rw") if lb in labels)])
        kinds = [e["type"] for e in chosen]
        rw = kinds.count("rw")
        kind = "G0" if set(kinds) == {"ww"} else "G1c" if rw == 0 else "G-single" if rw == 1 else "G2"
        start = nodes.index(min(nodes))
        if (kind, tuple(nodes[start:] + nodes[:start])) not in seen:
            seen.add((kind, tuple(nodes[start:] + nodes[:start])))
            path = "".join(f"T{e['from']} -{e['type']}({e['key']!r})-> " for e in chosen) + f"T{nodes[0]}"
            found.append({"type": kind, "txns": nodes, "edges": chosen,
                          "explanation": f"{_CYCLE_DESCRIPTIONS[kind].format(n=rw)}: {path}"})
        return kind

    def closing(graph: Any, a: int, b: int) -> list[int] | None:
        """The cycle a -> b -> ... -> a through the edge a -> b, shortest path back in graph."""
        if a not in graph or b not in graph:
            return None
        try:
            path: list[int] = nx.shortest_path(graph, b, a)
        except nx.NetworkXNoPath:
            return None
        return [a, *path[:-1]]

    for scc in sorted(nx.strongly_connected_components(full), key=min):
        if len(scc) < 2:
            continue
        inside = sorted((a, b) for a, b in edges if a in scc and b in scc)
        kinds: set[str] = set()
        ww_in, wwr_in = ww.subgraph(scc), wwr.subgraph(scc)
        for component in sorted(nx.strongly_connected_components(ww_in), key=min):
            if len(component) > 1:
                kinds.add(report([a for a, _ in nx.find_cycle(ww_in.subgraph(component))]))
                break
        for a, b in inside:
            if "wr" in edges[(a, b)] and (cycle := closing(wwr_in, a, b)) is not None:
                kinds.add(report(cycle))
                break
        rw_only = [(a, b) for a, b in inside if edges[(a, b)].keys() == {"rw"}]
        for a, b in rw_only[:_RW_TRIES_PER_SCC]:
            if (cycle := closing(wwr_in, a, b)) is not None:
                kinds.add(report(cycle))
                break
        if rw_only and "G-single" not in kinds:
            a, b = rw_only[0]
            cycle = closing(full.subgraph(scc), a, b)
            assert cycle is not None  # a strongly connected component has a path back
            report(cycle)
    return found
