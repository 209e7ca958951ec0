"""The coordinator's durable records: commit decisions and the transaction-id high-water mark.

Presumed abort: only ``commit`` decisions are written (and heuristic decisions an
operator makes). A decision row is written before phase 2 and marked ``done`` when
every writing participant acknowledged; done rows are history, pruned by age.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._appender import TRANSACT, GroupCommitAppender, RecordKind
from ._database import Database
from ._raw import raw_executemany
from ._txn_schema import decisions, txid_blocks


class DecisionExists(Exception):
    """A decision for this transaction is already recorded (it never changes)."""


class CoordinatorLog:
    def __init__(self, database: Database, appender: GroupCommitAppender, name: str = "coordinator") -> None:
        self.database = database
        self.appender = appender
        self.name = name

    async def load(self) -> tuple[int, list[tuple[int, tuple[str, ...], set[str]]]]:
        """(durable txid block end, undone commit decisions as (txid, participants, acked));
        ``participants`` are the writers that must be told."""
        name = self.name

        def read(conn: Connection) -> tuple[int, list[tuple[int, tuple[str, ...], set[str]]]]:
            end = conn.execute(
                sa.select(txid_blocks.c.block_end).where(txid_blocks.c.coordinator == name)
            ).scalar()
            rows = conn.execute(
                sa.select(decisions.c.txid, decisions.c.participants, decisions.c.acked)
                .where(
                    decisions.c.coordinator == name,
                    decisions.c.done.is_(False),
                    decisions.c.outcome == "commit",
                )
                .order_by(decisions.c.txid)
            ).all()
            undone = [(int(r.txid), tuple(cbor2.loads(r.participants)), set(cbor2.loads(r.acked))) for r in rows]
            # A commit with no writing participant (read-only everywhere) has nobody to
            # tell: it is done, even though no done mark was written for it. (Found by
            # the simulator: re-driving such records after a restart crashed phase 2.)
            return int(end or 0), [record for record in undone if record[1]]

        return await self.database.read(read)

    async def write_block(self, block_end: int) -> None:
        name = self.name

        def write(conn: Connection) -> None:
            updated = conn.execute(
                sa.update(txid_blocks)
                .where(txid_blocks.c.coordinator == name, txid_blocks.c.block_end < block_end)
                .values(block_end=block_end)
            ).rowcount
            if not updated:
                exists = conn.execute(
                    sa.select(txid_blocks.c.block_end).where(txid_blocks.c.coordinator == name)
                ).first()
                if exists is None:
                    conn.execute(sa.insert(txid_blocks).values(coordinator=name, block_end=block_end))

        await self.appender.append(TRANSACT, write)

    async def write_decision(
        self,
        txid: int,
        outcome: str,
        participants: tuple[str, ...],
        *,
        heuristic: bool = False,
        reason: str = "",
        done: bool = False,
    ) -> None:
        """Durably record the decision; raises :class:`DecisionExists` if one is recorded."""
        row = {
            "coordinator": self.name,
            "txid": txid,
            "outcome": outcome,
            "participants": cbor2.dumps(list(participants)),
            "acked": cbor2.dumps([]),
            "done": done,
            "heuristic": heuristic,
            "reason": reason,
            "decided_at": time.time(),
        }
        if not heuristic:
            # The coordinator decides each transaction once, from memory: a plain batched
            # insert (a duplicate would be a bug, and fails the batch loudly).
            await self.appender.append(DECISIONS, row)
            return
        name = self.name

        def write(conn: Connection) -> None:
            found = conn.execute(
                sa.select(decisions.c.outcome).where(
                    decisions.c.coordinator == name, decisions.c.txid == txid
                )
            ).first()
            if found is not None:
                raise DecisionExists(f"transaction {txid} already has the decision {found.outcome!r}")
            conn.execute(sa.insert(decisions).values(**row))

        await self.appender.append(TRANSACT, write)

    async def mark_done(self, txid: int, acked: set[str]) -> None:
        """Phase 2 finished. Not needed for safety (a lost mark re-drives an idempotent
        phase 2 after a restart), so it rides whatever batch comes next."""
        await self.appender.append(DONE_MARKS, self._done_mark(txid, acked))

    def mark_done_nowait(
        self, txid: int, acked: set[str], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """:meth:`mark_done` without waiting (no task per mark): ``done(None, error)`` is
        called from the appender's flusher if it fails. Raises what ``append`` raises
        before queueing (the appender closed, its queue full)."""
        self.appender.append_nowait(DONE_MARKS, self._done_mark(txid, acked), done)

    def _done_mark(self, txid: int, acked: set[str]) -> tuple[str, int, bytes]:
        return (self.name, txid, cbor2.dumps(sorted(acked)))

    async def get(self, txid: int) -> dict[str, Any] | None:
        name = self.name

        def read(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(
                sa.select(decisions).where(decisions.c.coordinator == name, decisions.c.txid == txid)
            ).first()
            return None if row is None else _row(row)

        return await self.database.read(read)

    async def list(self, *, undone_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        name = self.name

        def read(conn: Connection) -> list[dict[str, Any]]:
            query = sa.select(decisions).where(decisions.c.coordinator == name)
            if undone_only:
                query = query.where(decisions.c.done.is_(False))
            rows = conn.execute(query.order_by(decisions.c.txid.desc()).limit(limit)).all()
            return [_row(r) for r in rows]

        return await self.database.read(read)

    async def prune(self, older_than: float) -> int:
        """Delete done decisions decided before ``older_than`` (wall-clock seconds)."""
        name = self.name

        def write(conn: Connection) -> int:
            return int(
                conn.execute(
                    sa.delete(decisions).where(
                        decisions.c.coordinator == name,
                        decisions.c.done.is_(True),
                        decisions.c.decided_at < older_than,
                    )
                ).rowcount
            )

        result: int = await self.appender.append(TRANSACT, write)
        return result


def _row(row: Any) -> dict[str, Any]:
    return {
        "txid": int(row.txid),
        "outcome": row.outcome,
        "participants": list(cbor2.loads(row.participants)),
        "acked": list(cbor2.loads(row.acked)),
        "done": bool(row.done),
        "heuristic": bool(row.heuristic),
        "reason": row.reason,
        "decided_at": float(row.decided_at),
    }


# Both batch writers run for every distributed commit: statements are built once, and
# on SQLite go straight to the driver's cursor (see storage._shard_store).
_INSERT_DECISION = sa.insert(decisions)
_MARK_DONE = (
    sa.update(decisions)
    .where(
        decisions.c.coordinator == sa.bindparam("b_coordinator"),
        decisions.c.txid == sa.bindparam("b_txid"),
    )
    .values(done=True, acked=sa.bindparam("b_acked"))
)
_RAW_INSERT_DECISION = (
    "INSERT INTO txrpc_decisions (coordinator, txid, outcome, participants, acked, done, heuristic, reason, "
    "decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RAW_MARK_DONE = "UPDATE txrpc_decisions SET done = 1, acked = ? WHERE coordinator = ? AND txid = ?"


def _write_decisions(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[None]:
    if conn.dialect.name == "sqlite":
        raw_executemany(
            conn,
            _RAW_INSERT_DECISION,
            [
                (
                    r["coordinator"],
                    r["txid"],
                    r["outcome"],
                    r["participants"],
                    r["acked"],
                    1 if r["done"] else 0,
                    1 if r["heuristic"] else 0,
                    r["reason"],
                    r["decided_at"],
                )
                for r in rows
            ],
        )
    else:
        conn.execute(_INSERT_DECISION, list(rows))
    return [None] * len(rows)


def _write_done(conn: Connection, marks: Sequence[tuple[str, int, bytes]]) -> list[None]:
    if conn.dialect.name == "sqlite":
        raw_executemany(conn, _RAW_MARK_DONE, [(a, c, t) for c, t, a in marks])
    else:
        conn.execute(_MARK_DONE, [{"b_coordinator": c, "b_txid": t, "b_acked": a} for c, t, a in marks])
    return [None] * len(marks)


DECISIONS: RecordKind[dict[str, Any], None] = RecordKind("decision", _write_decisions)
# Not needed for safety (see mark_done): committed when its writer wakes, flushed by
# the next durable batch.
DONE_MARKS: RecordKind[tuple[str, int, bytes], None] = RecordKind("decision_done", _write_done, durable=False)
