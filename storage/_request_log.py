"""The request log: one row per (caller identity, idempotency key).

A row is created ``in_progress`` by :meth:`RequestLog.begin` with a lease and an
``attempt`` number, and becomes ``completed`` with exactly one outcome (a CBOR
response, or an error code + message + CBOR details) by :meth:`RequestLog.complete`.
Every write goes through the group-commit appender, so it is durable when the call
returns and shares its fsync with concurrent writers.

The log records; it does not decide. Whether an existing row means "replay",
"mismatch", "in progress" or "take over" is decided by the caller (txrpc's sans-IO
``_idempotency`` module) from the row :meth:`begin` returns. The decisions that need
atomicity are guarded here:

- ``begin`` inserts only if no row exists (one caller wins a race, all others see
  the winner's row);
- ``take_over`` bumps ``attempt`` and the lease only if the attempt is still the one
  the caller saw *and* the lease has expired at ``now`` (two takers: one wins);
- ``complete`` / ``release`` / ``renew_lease`` act only for the current attempt of an
  in-progress row (a deposed executor cannot overwrite its successor's outcome).

``complete(..., extra_writes=f)`` runs ``f(conn)`` in the same transaction (and the
same savepoint) as the completion: both commit or neither does.

``begin_and_run`` is the one-write path for handlers that never suspend: when the
key is new and the batch is written on the event loop's own thread (SQLite inline
writes), the handler runs *inside* the batch's transaction and its outcome is
inserted as a completed row there, so the row is never seen in progress at all.

Times are seconds on the caller's clock, passed in as ``now``; storage never reads
a clock. Leases and retention are compared against stored times, so the caller's
clock must survive restarts (wall-clock seconds, injected).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from ._appender import GroupCommitAppender, RecordKind, Rejected
from ._database import Database
from ._errors import LeaseLost
from ._schema import request_log

LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 10_000


class RequestState(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


@dataclasses.dataclass(frozen=True, slots=True)
class StoredError:
    """A recorded error outcome: a code from txrpc's table, a message, CBOR-encoded details."""

    code: int
    message: str
    details: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRecord:
    """One row of the request log, as read."""

    identity: str
    key: str
    method: str
    fingerprint: bytes
    state: RequestState
    attempt: int
    response: bytes | None
    error: StoredError | None
    created_at: float
    completed_at: float | None
    lease_expires_at: float
    replay_count: int
    last_replayed_at: float | None
    #: Canonical CBOR of ``[args, kwargs]`` as received (None for rows written before
    #: schema version 4, or by a caller that did not pass it): what replay re-sends.
    request: bytes | None = None

    @property
    def completed(self) -> bool:
        return self.state is RequestState.COMPLETED


@dataclasses.dataclass(frozen=True, slots=True)
class BeginResult:
    """What :meth:`RequestLog.begin` found: ``new`` (the row was just inserted, the
    caller owns attempt 1) or the existing ``record`` for the caller to decide on."""

    new: bool
    record: RequestRecord


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLogStats:
    """Counts over the whole log. ``leases_expired`` counts in-progress rows whose lease
    ended at ``now`` (0 when no ``now`` was given): requests whose executor probably died."""

    total: int
    in_progress: int
    completed: int
    errors: int
    replays: int
    leases_expired: int
    oldest_created_at: float | None
    newest_created_at: float | None
    by_method: tuple[tuple[str, int], ...]


ExtraWrites = Callable[[Connection], object]


@dataclasses.dataclass(slots=True)  # (read-only by convention; not frozen: one per keyed call)
class Outcome:
    """What a handler run by :meth:`RequestLog.begin_and_run` produced.

    ``record`` False: a transient failure (nothing is recorded; a retry runs afresh).
    Otherwise exactly one of ``response`` (CBOR) or ``error`` is recorded, with
    ``extra_writes(conn)`` in the same savepoint. ``value`` is opaque to the log and
    handed back to the caller in :class:`RanResult`.
    """

    response: bytes | None = None
    error: StoredError | None = None
    record: bool = True
    extra_writes: ExtraWrites | None = None
    value: Any = None


@dataclasses.dataclass(slots=True)  # (read-only by convention; not frozen: one per keyed call)
class RanResult:
    """:meth:`RequestLog.begin_and_run` ran the handler: its ``outcome``, and whether it
    is ``recorded`` as a completed row (False when ``outcome.record`` was False)."""

    outcome: Outcome
    recorded: bool


def _record(row: Row[Any]) -> RequestRecord:
    m = row._mapping
    error = None
    if m["error_code"] is not None:
        error = StoredError(
            int(m["error_code"]), str(m["error_message"] or ""), bytes(m["error_details"] or b"")
        )
    return RequestRecord(
        identity=m["identity"],
        key=m["idempotency_key"],
        method=m["method"],
        fingerprint=bytes(m["fingerprint"]),
        state=RequestState(m["state"]),
        attempt=int(m["attempt"]),
        response=None if m["response"] is None else bytes(m["response"]),
        error=error,
        created_at=float(m["created_at"]),
        completed_at=None if m["completed_at"] is None else float(m["completed_at"]),
        lease_expires_at=float(m["lease_expires_at"]),
        replay_count=int(m["replay_count"]),
        last_replayed_at=None if m["last_replayed_at"] is None else float(m["last_replayed_at"]),
        request=None if m["request"] is None else bytes(m["request"]),
    )


# Statements are built once with bind parameters: building SQLAlchemy expressions per
# record costs more CPU than executing them, and these run for every idempotent call.
_c = request_log.c
_IN_PROGRESS = RequestState.IN_PROGRESS.value
_COMPLETED = RequestState.COMPLETED.value
_IN_CHUNK = 400  # keys per IN (...) list


def _by_identity(pks: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """``pks`` as (identity, up to _IN_CHUNK keys) groups, duplicates dropped.

    Lookups are written ``identity = ? AND idempotency_key IN (...)``: both SQLite and
    PostgreSQL search the primary key with that, whereas a row-value
    ``(identity, key) IN (...)`` makes SQLite scan the whole table (measured: a
    complete batch cost grew with the log's size).
    """
    keys_of: dict[str, dict[str, None]] = {}
    for identity, key in pks:
        keys_of.setdefault(identity, {})[key] = None
    groups: list[tuple[str, list[str]]] = []
    for identity, keys in keys_of.items():
        listed = list(keys)
        for offset in range(0, len(listed), _IN_CHUNK):
            groups.append((identity, listed[offset : offset + _IN_CHUNK]))
    return groups


_IN_KEYS = sa.and_(
    _c.identity == sa.bindparam("p_identity"), _c.idempotency_key.in_(sa.bindparam("p_keys", expanding=True))
)
_SELECT_MANY = sa.select(request_log).where(_IN_KEYS)
_SELECT_MANY_LOCKED = _SELECT_MANY.with_for_update()


def _is_pk(prefix: str = "p") -> sa.ColumnElement[bool]:
    return sa.and_(
        _c.identity == sa.bindparam(f"{prefix}_identity"), _c.idempotency_key == sa.bindparam(f"{prefix}_key")
    )


def _is_current_attempt() -> sa.ColumnElement[bool]:
    return sa.and_(_is_pk(), _c.state == _IN_PROGRESS, _c.attempt == sa.bindparam("p_attempt"))


_SELECT_ONE = sa.select(request_log).where(_is_pk())
_TAKE_OVER = (
    sa.update(request_log)
    .where(_is_current_attempt(), _c.lease_expires_at <= sa.bindparam("p_now"))
    .values(attempt=_c.attempt + 1, lease_expires_at=sa.bindparam("p_lease_expires_at"))
    .returning(*request_log.c)
)
_RENEW = (
    sa.update(request_log)
    .where(_is_current_attempt())
    .values(lease_expires_at=sa.bindparam("p_lease_expires_at"))
)
_COMPLETE = (
    sa.update(request_log)
    .where(_is_current_attempt())
    .values(
        state=_COMPLETED,
        completed_at=sa.bindparam("p_completed_at"),
        response=sa.bindparam("p_response", type_=sa.LargeBinary),
        error_code=sa.bindparam("p_error_code", type_=sa.Integer),
        error_message=sa.bindparam("p_error_message", type_=sa.String),
        error_details=sa.bindparam("p_error_details", type_=sa.LargeBinary),
    )
)
_RELEASE = sa.delete(request_log).where(_is_current_attempt())
_REPLAYED = (
    sa.update(request_log)
    .where(_is_pk(), _c.state == _COMPLETED)
    .values(replay_count=_c.replay_count + 1, last_replayed_at=sa.bindparam("p_now"))
)


@functools.cache
def _insert_if_absent(dialect: str) -> Any:
    """INSERT .. ON CONFLICT DO NOTHING RETURNING the key of each row actually inserted."""
    from sqlalchemy.dialects import postgresql, sqlite

    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(request_log).on_conflict_do_nothing().returning(_c.identity, _c.idempotency_key)


def _pk_params(identity: str, key: str) -> dict[str, Any]:
    return {"p_identity": identity, "p_key": key}


def _select_rows(
    conn: Connection, pks: Sequence[tuple[str, str]], *, lock: bool
) -> dict[tuple[str, str], RequestRecord]:
    """The rows for ``pks`` (missing ones absent), with row locks on PostgreSQL if ``lock``."""
    found: dict[tuple[str, str], RequestRecord] = {}
    query = _SELECT_MANY_LOCKED if lock and conn.dialect.name == "postgresql" else _SELECT_MANY
    for identity, keys in _by_identity(pks):
        for row in conn.execute(query, {"p_identity": identity, "p_keys": keys}):
            record = _record(row)
            found[(record.identity, record.key)] = record
    return found


# -- SQLite fast path ----------------------------------------------------------------
#
# The begin and completion kinds run for every keyed call; on SQLite they use the
# driver's cursor directly (executemany with prebuilt SQL), which costs a fraction of
# SQLAlchemy's per-row parameter processing. This is safe without ON CONFLICT: the
# appender's transaction is BEGIN IMMEDIATE, so no other writer (thread or process)
# can insert or change a row between our SELECT and our INSERT/UPDATE.

_RAW_COLUMNS = (
    "identity, idempotency_key, method, fingerprint, state, attempt, response, error_code, "
    "error_message, error_details, created_at, completed_at, lease_expires_at, replay_count, "
    "last_replayed_at, request"
)
_RAW_INSERT = (
    "INSERT INTO txrpc_request_log (identity, idempotency_key, method, fingerprint, state, attempt, "
    "created_at, lease_expires_at, replay_count, request) VALUES (?, ?, ?, ?, 'in_progress', 1, ?, ?, 0, ?)"
)
_RAW_COMPLETE = (
    "UPDATE txrpc_request_log SET state = 'completed', completed_at = ?, response = ?, error_code = ?, "
    "error_message = ?, error_details = ? "
    "WHERE identity = ? AND idempotency_key = ? AND state = 'in_progress' AND attempt = ?"
)


def _raw_record(row: Sequence[Any]) -> RequestRecord:
    error = None
    if row[7] is not None:
        error = StoredError(int(row[7]), str(row[8] or ""), bytes(row[9] or b""))
    return RequestRecord(
        identity=row[0],
        key=row[1],
        method=row[2],
        fingerprint=bytes(row[3]),
        state=RequestState(row[4]),
        attempt=int(row[5]),
        response=None if row[6] is None else bytes(row[6]),
        error=error,
        created_at=float(row[10]),
        completed_at=None if row[11] is None else float(row[11]),
        lease_expires_at=float(row[12]),
        replay_count=int(row[13]),
        last_replayed_at=None if row[14] is None else float(row[14]),
        request=None if row[15] is None else bytes(row[15]),
    )


def _raw_select_rows(cursor: Any, pks: Sequence[tuple[str, str]]) -> dict[tuple[str, str], RequestRecord]:
    found: dict[tuple[str, str], RequestRecord] = {}
    for identity, keys in _by_identity(pks):
        marks = ", ".join("?" * len(keys))
        where = f"identity = ? AND idempotency_key IN ({marks})"
        cursor.execute(f"SELECT {_RAW_COLUMNS} FROM txrpc_request_log WHERE {where}", [identity, *keys])
        for row in cursor.fetchall():
            record = _raw_record(row)
            found[(record.identity, record.key)] = record
    return found


def _raw_cursor(conn: Connection) -> Any | None:
    """The driver's cursor on the connection's open transaction (SQLite only), else None."""
    if conn.dialect.name != "sqlite":
        return None
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _lease_lost(identity: str, key: str, attempt: int, current: RequestRecord | None) -> LeaseLost:
    if current is None:
        why = "the row no longer exists (released or pruned)"
    elif current.completed:
        why = f"it is already completed (by attempt {current.attempt})"
    else:
        why = f"attempt {current.attempt} took it over"
    return LeaseLost(f"request ({identity!r}, {key!r}) attempt {attempt} is not current: {why}")


# -- blocking queries on a connection (also used by the CLI) ------------------------


def get_request(conn: Connection, identity: str, key: str) -> RequestRecord | None:
    """The row for (identity, key), or None."""
    row = conn.execute(_SELECT_ONE, _pk_params(identity, key)).one_or_none()
    return None if row is None else _record(row)


def find_requests(conn: Connection, key: str) -> list[RequestRecord]:
    """Every row with idempotency key ``key``, whatever the identity (ordered by identity)."""
    rows = conn.execute(
        sa.select(request_log).where(request_log.c.idempotency_key == key).order_by(request_log.c.identity)
    )
    return [_record(row) for row in rows]


def list_requests(
    conn: Connection,
    *,
    state: RequestState | str | None = None,
    method: str | None = None,
    identity: str | None = None,
    since: float | None = None,
    limit: int = LIST_LIMIT_DEFAULT,
) -> list[RequestRecord]:
    """Rows matching every filter given, newest first, at most ``limit`` (1..LIST_LIMIT_MAX).

    ``since`` keeps rows created at or after it. Raises ``ValueError`` for a bad
    ``state`` or ``limit``.
    """
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise ValueError(f"limit must be in 1..{LIST_LIMIT_MAX}")
    query = sa.select(request_log)
    if state is not None:
        query = query.where(request_log.c.state == RequestState(state).value)
    if method is not None:
        query = query.where(request_log.c.method == method)
    if identity is not None:
        query = query.where(request_log.c.identity == identity)
    if since is not None:
        query = query.where(request_log.c.created_at >= since)
    query = query.order_by(
        request_log.c.created_at.desc(), request_log.c.identity, request_log.c.idempotency_key
    ).limit(limit)
    return [_record(row) for row in conn.execute(query)]


def request_stats(conn: Connection, now: float | None = None) -> RequestLogStats:
    """Aggregate counts over the log (see :class:`RequestLogStats`)."""
    c = request_log.c
    completed = c.state == RequestState.COMPLETED.value
    in_progress = c.state == RequestState.IN_PROGRESS.value
    expired: sa.ColumnElement[bool] = sa.false()
    if now is not None:
        expired = sa.and_(in_progress, c.lease_expires_at <= now)

    def count_where(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    row = conn.execute(
        sa.select(
            sa.func.count(),
            count_where(in_progress),
            count_where(completed),
            count_where(sa.and_(completed, c.error_code.is_not(None))),
            sa.func.coalesce(sa.func.sum(c.replay_count), 0),
            count_where(expired),
            sa.func.min(c.created_at),
            sa.func.max(c.created_at),
        )
    ).one()
    by_method = conn.execute(
        sa.select(c.method, sa.func.count()).group_by(c.method).order_by(sa.func.count().desc(), c.method)
    ).all()
    return RequestLogStats(
        total=int(row[0]),
        in_progress=int(row[1]),
        completed=int(row[2]),
        errors=int(row[3]),
        replays=int(row[4]),
        leases_expired=int(row[5]),
        oldest_created_at=None if row[6] is None else float(row[6]),
        newest_created_at=None if row[7] is None else float(row[7]),
        by_method=tuple((str(method), int(count)) for method, count in by_method),
    )


def prune_requests(
    conn: Connection, older_than: float, *, dry_run: bool = False, limit: int | None = None
) -> int:
    """Delete rows past retention and return how many: completed rows whose
    ``completed_at`` is before ``older_than``, and in-progress rows whose lease ended
    before ``older_than`` (abandoned by a dead executor). ``dry_run`` only counts.

    ``limit`` deletes at most that many rows (oldest first), so a pruner can work in
    short transactions that do not hold the write lock for long."""
    c = request_log.c
    condition = sa.or_(
        sa.and_(c.state == RequestState.COMPLETED.value, c.completed_at < older_than),
        sa.and_(c.state == RequestState.IN_PROGRESS.value, c.lease_expires_at < older_than),
    )
    if dry_run:
        return int(conn.execute(sa.select(sa.func.count()).where(condition)).scalar_one())
    if limit is None:
        return int(conn.execute(sa.delete(request_log).where(condition)).rowcount)
    if limit < 1:
        raise ValueError("limit must be >= 1")
    victims = sa.select(c.identity, c.idempotency_key).where(condition).order_by(c.created_at).limit(limit)
    pks = [(str(i), str(k)) for i, k in conn.execute(victims)]
    delete = sa.delete(request_log).where(_IN_KEYS, condition)
    deleted = 0
    for identity, keys in _by_identity(pks):
        deleted += int(conn.execute(delete, {"p_identity": identity, "p_keys": keys}).rowcount)
    return deleted


def replay_requests(
    conn: Connection,
    *,
    method: str | None = None,
    identity: str | None = None,
    since: float | None = None,
    until: float | None = None,
    after: tuple[float, str, str] | None = None,
    limit: int = LIST_LIMIT_DEFAULT,
) -> list[RequestRecord]:
    """Completed rows in their original order (``created_at``, then identity and key),
    for ``txrpc replay``: at most ``limit`` (1..LIST_LIMIT_MAX) of them.

    ``since`` / ``until`` keep rows created in ``[since, until)``; ``after`` is the
    ``(created_at, identity, key)`` of the last row of the previous page (keyset
    pagination: pages stay correct while the log grows).
    """
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise ValueError(f"limit must be in 1..{LIST_LIMIT_MAX}")
    c = request_log.c
    query = sa.select(request_log).where(c.state == RequestState.COMPLETED.value)
    if method is not None:
        query = query.where(c.method == method)
    if identity is not None:
        query = query.where(c.identity == identity)
    if since is not None:
        query = query.where(c.created_at >= since)
    if until is not None:
        query = query.where(c.created_at < until)
    if after is not None:
        created_at, after_identity, after_key = after
        query = query.where(
            c.created_at >= created_at,
            sa.or_(
                c.created_at > created_at,
                c.identity > after_identity,
                sa.and_(c.identity == after_identity, c.idempotency_key > after_key),
            ),
        )
    query = query.order_by(c.created_at, c.identity, c.idempotency_key).limit(limit)
    return [_record(row) for row in conn.execute(query)]


def count_replayable(
    conn: Connection,
    *,
    method: str | None = None,
    identity: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> int:
    """How many rows :func:`replay_requests` would page through with these filters."""
    c = request_log.c
    query = sa.select(sa.func.count()).select_from(request_log).where(c.state == RequestState.COMPLETED.value)
    if method is not None:
        query = query.where(c.method == method)
    if identity is not None:
        query = query.where(c.identity == identity)
    if since is not None:
        query = query.where(c.created_at >= since)
    if until is not None:
        query = query.where(c.created_at < until)
    return int(conn.execute(query).scalar_one())


# -- record kinds written through the group-commit appender -------------------------


@dataclasses.dataclass(slots=True)  # (not frozen: built for every keyed call, 5x cheaper)
class _Begin:
    identity: str
    key: str
    method: str
    fingerprint: bytes
    lease_s: float
    now: float
    request: bytes | None


def _raw_insert_begins(
    cursor: Any, firsts: list[_Begin]
) -> tuple[dict[tuple[str, str], RequestRecord], list[_Begin]]:
    """SQLite: insert the begins whose key has no row; return (existing rows, inserted)."""
    existing = _raw_select_rows(cursor, [(r.identity, r.key) for r in firsts])
    fresh = [r for r in firsts if (r.identity, r.key) not in existing]
    cursor.executemany(
        _RAW_INSERT,
        [(r.identity, r.key, r.method, r.fingerprint, r.now, r.now + r.lease_s, r.request) for r in fresh],
    )
    return existing, fresh


def _write_begins(conn: Connection, records: Sequence[_Begin]) -> list[BeginResult | Rejected]:
    # The first record per key is inserted unless a row exists; later records for the
    # same key in this batch see that row, exactly as if they had come one by one.
    firsts: dict[tuple[str, str], _Begin] = {}
    for r in records:
        firsts.setdefault((r.identity, r.key), r)
    params = [
        {
            "identity": r.identity,
            "idempotency_key": r.key,
            "method": r.method,
            "fingerprint": r.fingerprint,
            "state": _IN_PROGRESS,
            "attempt": 1,
            "created_at": r.now,
            "lease_expires_at": r.now + r.lease_s,
            "replay_count": 0,
            "request": r.request,
        }
        for r in firsts.values()
    ]
    cursor = _raw_cursor(conn)
    if cursor is not None:
        try:
            existing, fresh = _raw_insert_begins(cursor, list(firsts.values()))
        finally:
            cursor.close()
        inserted = {(r.identity, r.key) for r in fresh}
    else:
        inserted = {(str(i), str(k)) for i, k in conn.execute(_insert_if_absent(conn.dialect.name), params)}
        existing = _select_rows(conn, [pk for pk in firsts if pk not in inserted], lock=False)
    results: list[BeginResult | Rejected] = []
    for r in records:
        pk = (r.identity, r.key)
        if pk in inserted:
            first = firsts[pk]
            results.append(BeginResult(new=r is first, record=_in_progress(first)))
        else:
            assert pk in existing, "a row must exist after INSERT .. ON CONFLICT DO NOTHING"
            results.append(BeginResult(new=False, record=existing[pk]))
    return results


@dataclasses.dataclass(slots=True)  # (not frozen: built for every keyed call, 5x cheaper)
class _BeginRun(_Begin):
    run: Callable[[], Outcome]
    thread: int  # the event loop's thread: ``run`` is called only there


_RAW_INSERT_COMPLETED = (
    "INSERT INTO txrpc_request_log (identity, idempotency_key, method, fingerprint, state, attempt, "
    "response, error_code, error_message, error_details, created_at, completed_at, lease_expires_at, "
    "replay_count, request) VALUES (?, ?, ?, ?, 'completed', 1, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
)


def _write_begin_runs(conn: Connection, records: Sequence[_BeginRun]) -> list[BeginResult | RanResult | Rejected]:
    """SQLite only (the appender's transaction is BEGIN IMMEDIATE: no other writer can
    touch a row between our SELECT and our INSERT). Records are handled in queue order;
    a later record for a key an earlier one wrote sees that row."""
    cursor = _raw_cursor(conn)
    if cursor is None:
        raise AssertionError("begin_and_run is for SQLite (RequestLog.runs_inline)")
    try:
        return _begin_run_batch(conn, cursor, records)
    finally:
        cursor.close()


def _begin_run_batch(
    conn: Connection, cursor: Any, records: Sequence[_BeginRun]
) -> list[BeginResult | RanResult | Rejected]:
    on_loop = threading.get_ident()
    seen = _raw_select_rows(cursor, list(dict.fromkeys((r.identity, r.key) for r in records)))
    results: list[BeginResult | RanResult | Rejected] = []
    completed: list[tuple[Any, ...]] = []
    ran: dict[tuple[str, str], tuple[_Begin, Outcome]] = {}  # rows this batch completed
    for b in records:
        pk = (b.identity, b.key)
        row = seen.get(pk)
        if row is None and pk in ran:  # (rare: a second record for a key this batch ran)
            row = seen[pk] = _completed(*ran.pop(pk))
        if row is not None:
            results.append(BeginResult(new=False, record=row))
            continue
        if b.thread != on_loop:
            # Written on a worker thread (the database was busy, or the writer connection
            # was being opened): the handler cannot run here. Begin as usual instead.
            cursor.execute(
                _RAW_INSERT,
                (b.identity, b.key, b.method, b.fingerprint, b.now, b.now + b.lease_s, b.request)
            )
            row = seen[pk] = _in_progress(b)
            results.append(BeginResult(new=True, record=row))
            continue
        try:
            outcome = b.run()
        except Exception as exc:  # (run's own bug): this record fails alone, nothing written for it
            results.append(Rejected(exc))
            continue
        if not outcome.record:
            results.append(RanResult(outcome, False))
            continue
        error = outcome.error
        params = (
            b.identity,
            b.key,
            b.method,
            b.fingerprint,
            outcome.response,
            None if error is None else error.code,
            None if error is None else error.message,
            None if error is None else error.details,
            b.now,
            b.now,
            b.now,
            b.request,
        )
        if outcome.extra_writes is None:
            completed.append(params)
        else:
            savepoint = conn.begin_nested()
            try:
                cursor.execute(_RAW_INSERT_COMPLETED, params)
                outcome.extra_writes(conn)
            except Exception as exc:
                savepoint.rollback()
                results.append(Rejected(exc))
                continue
            savepoint.commit()
        ran[pk] = (b, outcome)
        results.append(RanResult(outcome, True))
    if completed:
        cursor.executemany(_RAW_INSERT_COMPLETED, completed)
    return results


def _completed(b: _Begin, outcome: Outcome) -> RequestRecord:
    return RequestRecord(
        b.identity,
        b.key,
        b.method,
        b.fingerprint,
        RequestState.COMPLETED,
        1,
        outcome.response,
        outcome.error,
        b.now,
        b.now,
        b.now,
        0,
        None,
        b.request,
    )


def _ignore(result: object, error: BaseException | None) -> None:
    pass


def _in_progress(b: _Begin) -> RequestRecord:
    return RequestRecord(
        identity=b.identity,
        key=b.key,
        method=b.method,
        fingerprint=b.fingerprint,
        state=RequestState.IN_PROGRESS,
        attempt=1,
        response=None,
        error=None,
        created_at=b.now,
        completed_at=None,
        lease_expires_at=b.now + b.lease_s,
        replay_count=0,
        last_replayed_at=None,
        request=b.request,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _TakeOver:
    identity: str
    key: str
    attempt_seen: int
    lease_s: float
    now: float


def _write_take_overs(conn: Connection, records: Sequence[_TakeOver]) -> list[RequestRecord | None]:
    results: list[RequestRecord | None] = []
    for r in records:
        row = conn.execute(
            _TAKE_OVER,
            {
                **_pk_params(r.identity, r.key),
                "p_attempt": r.attempt_seen,
                "p_now": r.now,
                "p_lease_expires_at": r.now + r.lease_s,
            },
        ).one_or_none()
        results.append(None if row is None else _record(row))
    return results


@dataclasses.dataclass(frozen=True, slots=True)
class _Renew:
    identity: str
    key: str
    attempt: int
    lease_s: float
    now: float


def _write_renewals(conn: Connection, records: Sequence[_Renew]) -> list[bool]:
    return [
        conn.execute(
            _RENEW,
            {
                **_pk_params(r.identity, r.key),
                "p_attempt": r.attempt,
                "p_lease_expires_at": r.now + r.lease_s,
            },
        ).rowcount
        == 1
        for r in records
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class _Complete:
    identity: str
    key: str
    attempt: int
    now: float
    response: bytes | None
    error: StoredError | None
    extra_writes: ExtraWrites | None


def _write_completions(conn: Connection, records: Sequence[_Complete]) -> list[RequestRecord | Rejected]:
    # One locking SELECT reads every row the batch completes; the guards are checked
    # here, in queue order, against that view (kept current as records succeed). Plain
    # completions then go in one executemany UPDATE; those with extra_writes each get
    # their own savepoint so the handler's writes and the completion commit together
    # or not at all. The UPDATE repeats the guard, so a drifted view fails loudly.
    cursor = _raw_cursor(conn)
    try:
        return _complete_batch(conn, cursor, records)
    finally:
        if cursor is not None:
            cursor.close()


def _complete_batch(
    conn: Connection, cursor: Any | None, records: Sequence[_Complete]
) -> list[RequestRecord | Rejected]:
    pks = [(r.identity, r.key) for r in records]
    current = _raw_select_rows(cursor, pks) if cursor is not None else _select_rows(conn, pks, lock=True)
    results: list[RequestRecord | Rejected] = []
    bulk: list[dict[str, Any]] = []
    for r in records:
        pk = (r.identity, r.key)
        row = current.get(pk)
        if row is None or row.completed or row.attempt != r.attempt:
            results.append(Rejected(_lease_lost(r.identity, r.key, r.attempt, row)))
            continue
        done = RequestRecord(  # (dataclasses.replace costs several times more, per record)
            row.identity,
            row.key,
            row.method,
            row.fingerprint,
            RequestState.COMPLETED,
            row.attempt,
            r.response,
            r.error,
            row.created_at,
            r.now,
            row.lease_expires_at,
            row.replay_count,
            row.last_replayed_at,
            row.request,
        )
        params = {
            **_pk_params(r.identity, r.key),
            "p_attempt": r.attempt,
            "p_completed_at": r.now,
            "p_response": r.response,
            "p_error_code": None if r.error is None else r.error.code,
            "p_error_message": None if r.error is None else r.error.message,
            "p_error_details": None if r.error is None else r.error.details,
        }
        if r.extra_writes is None:
            bulk.append(params)
        else:
            savepoint = conn.begin_nested()
            try:
                if conn.execute(_COMPLETE, params).rowcount != 1:
                    raise AssertionError(f"request-log row {pk} changed under the batch's lock")
                r.extra_writes(conn)
            except Exception as exc:
                savepoint.rollback()
                results.append(Rejected(exc))
                continue
            savepoint.commit()
        current[pk] = done
        results.append(done)
    if bulk and cursor is not None:
        cursor.executemany(
            _RAW_COMPLETE,
            [
                (
                    p["p_completed_at"],
                    p["p_response"],
                    p["p_error_code"],
                    p["p_error_message"],
                    p["p_error_details"],
                    p["p_identity"],
                    p["p_key"],
                    p["p_attempt"],
                )
                for p in bulk
            ],
        )
        if cursor.rowcount != len(bulk):
            raise AssertionError(f"{len(bulk)} completions updated {cursor.rowcount} request-log rows")
    elif bulk:
        updated = conn.execute(_COMPLETE, bulk).rowcount
        if conn.dialect.supports_sane_multi_rowcount and updated != len(bulk):
            raise AssertionError(f"{len(bulk)} completions updated {updated} request-log rows")
    return results


@dataclasses.dataclass(frozen=True, slots=True)
class _Release:
    identity: str
    key: str
    attempt: int


def _write_releases(conn: Connection, records: Sequence[_Release]) -> list[bool]:
    return [
        conn.execute(_RELEASE, {**_pk_params(r.identity, r.key), "p_attempt": r.attempt}).rowcount == 1
        for r in records
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class _Replayed:
    identity: str
    key: str
    now: float


def _write_replays(conn: Connection, records: Sequence[_Replayed]) -> list[bool]:
    return [
        conn.execute(_REPLAYED, {**_pk_params(r.identity, r.key), "p_now": r.now}).rowcount == 1
        for r in records
    ]


# Only a completion must be flushed before its writer wakes (a reply follows it).
# The other records are committed (visible everywhere, surviving a crash of this
# process) and become durable against power loss with the next flushed batch: losing
# them in a power cut loses nothing a caller was told (see specs/guarantees.md).
BEGIN: RecordKind[_Begin, BeginResult] = RecordKind("request_log.begin", _write_begins, durable=False)
TAKE_OVER: RecordKind[_TakeOver, RequestRecord | None] = RecordKind(
    "request_log.take_over", _write_take_overs, durable=False
)
RENEW: RecordKind[_Renew, bool] = RecordKind("request_log.renew", _write_renewals, durable=False)
COMPLETE: RecordKind[_Complete, RequestRecord] = RecordKind("request_log.complete", _write_completions)
BEGIN_RUN: RecordKind[_BeginRun, BeginResult | RanResult] = RecordKind("request_log.begin_run", _write_begin_runs)
RELEASE: RecordKind[_Release, bool] = RecordKind("request_log.release", _write_releases, durable=False)
REPLAYED: RecordKind[_Replayed, bool] = RecordKind("request_log.replayed", _write_replays, durable=False)

_Records = list[RequestRecord]


class RequestLog:
    """The request-log repository for trio code: writes through ``appender`` (durable
    on return), reads on ``database``'s reader threads."""

    def __init__(self, database: Database, appender: GroupCommitAppender) -> None:
        if appender.database is not database:
            raise ValueError("the appender must write to the same database")
        self.database = database
        self.appender = appender

    async def begin(
        self,
        identity: str,
        key: str,
        method: str,
        fingerprint: bytes,
        lease_s: float,
        now: float,
        *,
        request: bytes | None = None,
    ) -> BeginResult:
        """Insert an in-progress row (attempt 1, lease until ``now + lease_s``) unless one exists.

        ``request`` (canonical CBOR of ``[args, kwargs]``) is stored for ``txrpc replay``.

        Returns ``BeginResult(new=True, ...)`` when this call inserted it (the caller
        now runs the request), else ``new=False`` with the existing row, untouched.
        Of concurrent begins for one (identity, key) exactly one gets ``new``.
        Durable on return. Raises the appender's errors (``AppendQueueFull``, ...).
        """
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        return await self.appender.append(
            BEGIN, _Begin(identity, key, method, fingerprint, lease_s, now, request)
        )

    @property
    def runs_inline(self) -> bool:
        """Whether :meth:`begin_and_run` can run handlers inside the batch (SQLite with
        the appender's inline writes); otherwise use :meth:`begin`."""
        return self.appender.inline_writes

    async def begin_and_run(
        self,
        identity: str,
        key: str,
        method: str,
        fingerprint: bytes,
        lease_s: float,
        now: float,
        run: Callable[[], Outcome],
        *,
        request: bytes | None = None,
    ) -> BeginResult | RanResult:
        """:meth:`begin` and, for a new key, run and record the request in one write.

        For a new key whose batch is written on this (the event loop's) thread,
        ``run()`` is called inside the batch's transaction, holding the write lock —
        so it must be quick and must not block or suspend — and its :class:`Outcome`
        is inserted as a completed row (attempt 1, ``completed_at = now``) with its
        ``extra_writes``: returns :class:`RanResult`. The row is never in progress, so
        no other executor can see or take over the key meanwhile.

        Otherwise as :meth:`begin`: the existing row (``BeginResult(new=False)``), or
        — the batch went to a worker thread — an in-progress row for the caller to run
        and complete (``BeginResult(new=True)``).

        Durable on return. Raises the appender's errors, or what ``extra_writes``
        raised (the handler ran; nothing was recorded). Only where
        :attr:`runs_inline`.
        """
        return await self.appender.append(
            BEGIN_RUN, self._begin_run(identity, key, method, fingerprint, lease_s, now, run, request)
        )

    def begin_and_run_nowait(
        self,
        identity: str,
        key: str,
        method: str,
        fingerprint: bytes,
        lease_s: float,
        now: float,
        run: Callable[[], Outcome],
        done: Callable[[BeginResult | RanResult | None, BaseException | None], None],
        *,
        request: bytes | None = None,
    ) -> None:
        """:meth:`begin_and_run` without waiting (``GroupCommitAppender.append_nowait``):
        ``done(result, None)`` or ``done(None, error)`` is called, from the flusher's
        task, once the record is durable or failed. Raises only what queueing raises."""
        self.appender.append_nowait(
            BEGIN_RUN, self._begin_run(identity, key, method, fingerprint, lease_s, now, run, request), done
        )

    def _begin_run(
        self,
        identity: str,
        key: str,
        method: str,
        fingerprint: bytes,
        lease_s: float,
        now: float,
        run: Callable[[], Outcome],
        request: bytes | None,
    ) -> _BeginRun:
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        if not self.runs_inline:
            raise RuntimeError("begin_and_run needs SQLite with inline writes (see runs_inline); use begin()")
        return _BeginRun(identity, key, method, fingerprint, lease_s, now, request, run, threading.get_ident())

    async def take_over(
        self, identity: str, key: str, attempt_seen: int, lease_s: float, now: float
    ) -> RequestRecord | None:
        """Become the executor of an in-progress row whose lease expired.

        Succeeds (returns the row with ``attempt = attempt_seen + 1`` and a lease until
        ``now + lease_s``) only if the row is still in progress at ``attempt_seen`` and
        its lease ended at or before ``now``; otherwise returns None and changes
        nothing (another taker won, it completed, or the lease was renewed). Of
        concurrent takers that saw the same attempt at most one wins.
        """
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        return await self.appender.append(TAKE_OVER, _TakeOver(identity, key, attempt_seen, lease_s, now))

    async def renew_lease(self, identity: str, key: str, attempt: int, lease_s: float, now: float) -> bool:
        """Extend the lease of a long-running attempt to ``now + lease_s``.

        False (nothing changed) if ``attempt`` is no longer the current in-progress one.
        """
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        return await self.appender.append(RENEW, _Renew(identity, key, attempt, lease_s, now))

    async def complete(
        self,
        identity: str,
        key: str,
        attempt: int,
        *,
        now: float,
        response: bytes | None = None,
        error: StoredError | None = None,
        extra_writes: ExtraWrites | None = None,
    ) -> RequestRecord:
        """Record the outcome of ``attempt``: exactly one of ``response`` (CBOR bytes)
        or ``error``; ``completed_at = now``. Durable when it returns the completed row.

        ``extra_writes(conn)``, if given, runs in the same transaction and savepoint
        as the completion (after the guarded update): a handler's store writes and
        its log record commit together or not at all.

        Raises :class:`LeaseLost` if ``attempt`` is not the row's current in-progress
        attempt (nothing written, ``extra_writes`` not run); re-raises what
        ``extra_writes`` raised (e.g. :class:`WriteConflict`; the completion is then
        not recorded and the row stays in progress); :class:`BatchFailed` if the
        batch's transaction failed.
        """
        if (response is None) == (error is None):
            raise ValueError("give exactly one of response= or error=")
        return await self.appender.append(
            COMPLETE, _Complete(identity, key, attempt, now, response, error, extra_writes)
        )

    async def release(self, identity: str, key: str, attempt: int) -> bool:
        """Delete the in-progress row of ``attempt`` so a retry runs afresh.

        For attempts that end without an outcome worth replaying (cancelled, server
        shutting down, failed before any effect). False if ``attempt`` is not current.
        """
        return await self.appender.append(RELEASE, _Release(identity, key, attempt))

    def release_nowait(self, identity: str, key: str, attempt: int) -> None:
        """:meth:`release` without waiting for it (``GroupCommitAppender.append_nowait``);
        raises only what queueing raises."""
        self.appender.append_nowait(RELEASE, _Release(identity, key, attempt), _ignore)

    async def note_replay(self, identity: str, key: str, now: float) -> bool:
        """Count one replay of a completed row (``replay_count``, ``last_replayed_at``)."""
        return await self.appender.append(REPLAYED, _Replayed(identity, key, now))

    async def sync(self) -> None:
        """Wait until every outcome read so far is flushed (see ``GroupCommitAppender.sync``):
        call it before replaying a stored outcome to a client."""
        await self.appender.sync()

    async def get(self, identity: str, key: str) -> RequestRecord | None:
        """The row for (identity, key), or None."""
        return await self.database.read(lambda conn: get_request(conn, identity, key))

    async def list(
        self,
        *,
        state: RequestState | str | None = None,
        method: str | None = None,
        identity: str | None = None,
        since: float | None = None,
        limit: int = LIST_LIMIT_DEFAULT,
    ) -> _Records:
        """See :func:`list_requests`."""
        return await self.database.read(
            lambda conn: list_requests(
                conn, state=state, method=method, identity=identity, since=since, limit=limit
            )
        )

    async def stats(self, now: float | None = None) -> RequestLogStats:
        """See :func:`request_stats`."""
        return await self.database.read(lambda conn: request_stats(conn, now))

    async def prune(self, older_than: float, *, limit: int | None = None) -> int:
        """See :func:`prune_requests`; one durable write transaction (at most ``limit`` rows)."""
        return await self.database.write(lambda conn: prune_requests(conn, older_than, limit=limit))
