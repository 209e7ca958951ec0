"""Operation histories, Jepsen style: every client operation is an *invoke* followed by
its completion, ``ok`` (it happened), ``fail`` (it certainly did not happen) or ``info``
(the outcome is unknown: a timeout, a crash, a lost reply).

A :class:`History` is an append-only list of :class:`Op` records numbered from 0. Each
*process* (a logical client, an ``int``) has at most one operation outstanding, so an
invoke and its completion can be paired by process alone, which is how a history read
back from a file is paired again. A process whose operation ended ``info`` may go on
invoking; the checkers never assume it did not.

Times come from the caller (the simulator passes ``trio.current_time()``): this module
reads no clock, so a history recorded under a seeded simulation is reproducible.

Values must be JSON-serialisable for :meth:`History.dump`; JSON turns tuples into
lists and map keys into strings, so use lists and string keys where a value's exact
shape matters after a round trip.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, cast

__all__ = ["COMPLETION_TYPES", "OP_TYPES", "History", "Op", "OpType", "Pending"]

OpType: TypeAlias = Literal["invoke", "ok", "fail", "info"]
OP_TYPES: Final[tuple[OpType, ...]] = ("invoke", "ok", "fail", "info")
COMPLETION_TYPES: Final[tuple[OpType, ...]] = ("ok", "fail", "info")


@dataclass(frozen=True, slots=True)
class Op:
    """One history record: the invocation or the completion of an operation.

    ``index`` is the record's position in its history; ``f`` names the operation
    (``"txn"``, ``"transfer"``, ...); ``value`` is its argument (invoke) or its result
    (completion); ``time`` is the caller's clock, in seconds.
    """

    index: int
    process: int
    type: OpType
    f: str
    value: Any
    time: float

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready mapping."""
        return {
            "index": self.index,
            "process": self.process,
            "type": self.type,
            "f": self.f,
            "value": self.value,
            "time": self.time,
        }

    @classmethod
    def from_json(cls, data: Any) -> Op:
        """The record a :meth:`to_json` mapping describes; ``ValueError`` if malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"an op must be a JSON object, not {type(data).__name__}")
        missing = {"index", "process", "type", "f", "value", "time"} - data.keys()
        if missing:
            raise ValueError(f"op is missing {sorted(missing)}: {data!r}")
        index, process, type_, f, time = data["index"], data["process"], data["type"], data["f"], data["time"]
        if not _is_int(index) or not _is_int(process):
            raise ValueError(f"op index and process must be integers: {data!r}")
        if type_ not in OP_TYPES:
            raise ValueError(f"op type must be one of {OP_TYPES}: {data!r}")
        if not isinstance(f, str):
            raise ValueError(f"op f must be a string: {data!r}")
        if not _is_number(time):
            raise ValueError(f"op time must be a finite number: {data!r}")
        return cls(index, process, cast(OpType, type_), f, data["value"], float(time))

    def __str__(self) -> str:
        return f"{self.index} p{self.process} {self.type} {self.f} {self.value!r} @{self.time:g}"


class History:
    """An append-only, deterministic record of operations.

    Record with :meth:`invoke` then :meth:`complete` (the invoke :class:`Op` is the
    handle), with the :meth:`operation` context manager, or, for an event that is
    instantaneous from the recorder's point of view, with :meth:`record`. Not
    thread-safe; concurrent trio tasks may share one history.
    """

    __slots__ = ("_ops", "_outstanding")

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self._ops: list[Op] = []
        self._outstanding: dict[int, Op] = {}  # process -> its invoke awaiting completion
        for op in ops:
            self._append_checked(op)

    # -- recording ---------------------------------------------------------------------

    def invoke(self, process: int, f: str, value: Any, time: float) -> Op:
        """Record that ``process`` starts operation ``f`` with argument ``value``.

        Returns the invoke record, the handle to pass to :meth:`complete`. Raises
        ``ValueError`` if ``process`` still has an operation outstanding.
        """
        op = Op(len(self._ops), process, "invoke", f, value, float(time))
        self._append_checked(op)
        return op

    def complete(self, handle: Op, type: OpType, value: Any, time: float) -> Op:
        """Record the outcome of the operation ``handle`` (an :meth:`invoke` result):
        ``"ok"``, ``"fail"`` or ``"info"`` (unknown), with its result ``value``."""
        if self._outstanding.get(handle.process) is not handle:
            raise ValueError(f"not an outstanding invocation of this history: {handle}")
        op = Op(len(self._ops), handle.process, type, handle.f, value, float(time))
        self._append_checked(op)
        return op

    def record(self, process: int, f: str, value: Any, time: float, type: OpType = "ok") -> Op:
        """Record an instantaneous operation, an invoke and its completion at ``time``
        with the same ``value``; returns the completion."""
        return self.complete(self.invoke(process, f, value, time), type, value, time)

    @contextmanager
    def operation(self, process: int, f: str, value: Any, *, clock: Callable[[], float]) -> Iterator[Pending]:
        """Record an operation around a block::

            with history.operation(p, "txn", ops, clock=trio.current_time) as op:
                op.ok(await client.run(ops))

        The block completes the operation through the yielded :class:`Pending`. If it
        does not, a normal exit records ``ok`` with the invoke's value and an exception
        (cancellation included) records ``info`` (the outcome is unknown) and
        propagates.
        """
        pending = Pending(self, self.invoke(process, f, value, clock()), clock)
        try:
            yield pending
        except BaseException:
            if pending.completion is None:
                pending.info()
            raise
        if pending.completion is None:
            pending.ok()

    # -- reading -----------------------------------------------------------------------

    @property
    def ops(self) -> tuple[Op, ...]:
        """All records, in order."""
        return tuple(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(tuple(self._ops))

    def __getitem__(self, index: int) -> Op:
        return self._ops[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, History) and self._ops == other._ops

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<History of {len(self._ops)} ops, {len(self._outstanding)} outstanding>"

    @property
    def outstanding(self) -> tuple[Op, ...]:
        """Invocations not completed yet, by index."""
        return tuple(sorted(self._outstanding.values(), key=lambda op: op.index))

    def pairs(self) -> list[tuple[Op, Op | None]]:
        """Every invocation with its completion (``None`` while outstanding), in
        invocation order. An outstanding invocation counts as ``info`` for checkers."""
        result: list[tuple[Op, Op | None]] = []
        position: dict[int, int] = {}  # process -> its open pair's position in result
        for op in self._ops:
            if op.type == "invoke":
                position[op.process] = len(result)
                result.append((op, None))
            else:
                i = position.pop(op.process)
                result[i] = (result[i][0], op)
        return result

    # -- JSON lines --------------------------------------------------------------------

    def to_jsonl(self) -> str:
        """One compact JSON object per line, keys sorted: the :meth:`dump` format."""
        return "".join(_dumps(op.to_json()) + "\n" for op in self._ops)

    @classmethod
    def from_jsonl(cls, text: str) -> History:
        """The history a :meth:`to_jsonl` text describes; ``ValueError`` if malformed."""
        ops = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                ops.append(Op.from_json(json.loads(line)))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"history line {lineno}: {exc}") from None
        return cls(ops)

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the history to ``path`` as JSON lines (UTF-8)."""
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.to_jsonl())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        """Read a history :meth:`dump` wrote."""
        with open(path, encoding="utf-8") as file:
            return cls.from_jsonl(file.read())

    # -- internals ---------------------------------------------------------------------

    def _append_checked(self, op: Op) -> None:
        if op.index != len(self._ops):
            raise ValueError(f"op index {op.index} out of sequence, expected {len(self._ops)}")
        if not math.isfinite(op.time):
            raise ValueError(f"op time must be finite: {op}")
        if op.type not in OP_TYPES:
            raise ValueError(f"op type must be one of {OP_TYPES}: {op}")
        open_invoke = self._outstanding.get(op.process)
        if op.type == "invoke":
            if open_invoke is not None:
                raise ValueError(f"process {op.process} invoked {op} while {open_invoke} is outstanding")
            self._outstanding[op.process] = op
        else:
            if open_invoke is None:
                raise ValueError(f"completion without an outstanding invocation: {op}")
            if open_invoke.f != op.f:
                raise ValueError(f"completion {op} does not match its invocation {open_invoke}")
            del self._outstanding[op.process]
        self._ops.append(op)


class Pending:
    """An operation :meth:`History.operation` is recording; complete it once with
    :meth:`ok`, :meth:`fail` or :meth:`info` (the value defaults to the invoke's)."""

    __slots__ = ("_clock", "_history", "completion", "invocation")

    def __init__(self, history: History, invocation: Op, clock: Callable[[], float]) -> None:
        self._history = history
        self._clock = clock
        self.invocation = invocation
        self.completion: Op | None = None

    def ok(self, value: Any = ..., /) -> Op:
        return self._complete("ok", value)

    def fail(self, value: Any = ..., /) -> Op:
        return self._complete("fail", value)

    def info(self, value: Any = ..., /) -> Op:
        return self._complete("info", value)

    def _complete(self, type: OpType, value: Any) -> Op:
        if self.completion is not None:
            raise ValueError(f"operation already completed: {self.completion}")
        if value is ...:
            value = self.invocation.value
        self.completion = self._history.complete(self.invocation, type, value, self._clock())
        return self.completion


def _dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, int | float)) and not isinstance(x, bool) and math.isfinite(x)
