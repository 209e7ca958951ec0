"""Workloads for fault runs: services plus the client loops that record histories.

* **bank**: accounts spread over the shards; clients transfer money between two
  accounts (a cross-shard transaction most of the time) and read every balance in one
  transaction. Checked by :func:`check_bank` (total conserved, nothing negative).
* **list-append**: keys hold lists; a transaction appends unique elements to some keys
  and reads others. Checked by :func:`check_list_append` (Elle-style anomalies).

Every client operation is recorded as invoke → ok / fail / info. ``fail`` only when the
transaction certainly did not commit (it aborted, or failed before commit was asked);
``info`` when the outcome is unknown (commit asked, no definite answer).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

import txrpc

from ._history import History

# --------------------------------------------------------------------------- services


def bank_service() -> txrpc.Service:
    """The bank: transactional methods routed by the account (their first argument)."""
    bank = txrpc.Service("bank")

    @bank.transactional
    async def open_account(tx: Any, account: str, balance: int = 0) -> int:
        if await tx.get(account, for_update=True) is not None:
            raise txrpc.Abort(f"account {account} already exists")
        await tx.put(account, balance)
        return balance

    @bank.transactional
    async def balance(tx: Any, account: str) -> int:
        value = await tx.get(account)
        if value is None:
            raise txrpc.Abort(f"no account {account}")
        return int(value)

    @bank.transactional
    async def balances(tx: Any, account: str, *others: str) -> dict[str, int]:
        """Several accounts of the same shard (the caller groups them by shard)."""
        found = {}
        for name in (account, *others):
            value = await tx.get(name)
            if value is None:
                raise txrpc.Abort(f"no account {name}")
            found[name] = int(value)
        return found

    @bank.transactional
    async def withdraw(tx: Any, account: str, amount: int) -> int:
        current = await tx.get(account, default=0, for_update=True)
        if current < amount:
            raise txrpc.Abort(f"insufficient funds in {account}: {current} < {amount}")
        await tx.put(account, current - amount)
        return int(current - amount)

    @bank.transactional
    async def deposit(tx: Any, account: str, amount: int) -> int:
        current = await tx.get(account, default=0, for_update=True)
        await tx.put(account, current + amount)
        return int(current + amount)

    return bank


def list_append_service() -> txrpc.Service:
    """Lists under keys: ``la.append(key, element)`` and ``la.read(key)``."""
    la = txrpc.Service("la")

    @la.transactional
    async def append(tx: Any, key: str, element: int) -> None:
        current = await tx.get(key, default=[], for_update=True)
        await tx.put(key, [*current, element])

    @la.transactional
    async def read(tx: Any, key: str) -> list[int]:
        return list(await tx.get(key, default=[]))

    return la


# --------------------------------------------------------------------------- outcomes


async def _transaction(
    cluster: txrpc.Cluster, body: Callable[[Any], Awaitable[Any]], timeout_s: float
) -> tuple[str, Any]:
    """Run ``body(t)`` in a transaction; ("ok", result) / ("fail", reason) / ("info", reason)."""
    committing = False
    try:
        async with cluster.transaction(timeout_s) as t:
            result = await body(t)
            committing = True
        return "ok", result
    except txrpc.TransactionAborted as exc:
        return "fail", exc.reason
    except txrpc.OutcomeUnknown as exc:
        return "info", str(exc)
    except (txrpc.RpcError, trio.TooSlowError) as exc:
        # Before commit was asked nothing can have committed; during it, we cannot know.
        return ("info" if committing else "fail"), str(exc)


async def _recorded(
    cluster: txrpc.Cluster,
    history: History,
    process: int,
    f: str,
    value: Any,
    body: Callable[[Any], Awaitable[Any]],
    timeout_s: float,
    *,
    unsettled: Any = None,
) -> tuple[str, Any]:
    """Run ``body`` as one transaction recorded in ``history``: invoke with ``value``,
    complete with the result when ok, else with ``unsettled``. Returns (status, result)."""
    invoke = history.invoke(process, f, value, trio.current_time())
    status, result = await _transaction(cluster, body, timeout_s)
    history.complete(invoke, status, result if status == "ok" else unsettled, trio.current_time())  # type: ignore[arg-type]
    return status, result


@dataclass
class WorkloadOptions:
    clients: int = 4
    duration_s: float = 5.0
    #: Simulated pause between one client's operations.
    think_s: float = 0.005
    tx_timeout_s: float = 2.0
    accounts: int = 6
    initial_balance: int = 100
    keys: int = 6
    #: Share of bank operations that read every balance (the rest are transfers).
    read_p: float = 0.2
    #: Share of transfers whose operations run at once, in one transaction: the amount
    #: withdrawn from the source in two concurrent withdrawals, the deposit beside them
    #: (at a shard they take turns, and wait for other transactions' locks).
    concurrent_p: float = 0.0


def accounts_of(options: WorkloadOptions) -> list[str]:
    return [f"acct{i}" for i in range(options.accounts)]


async def bank_setup(cluster: txrpc.Cluster, options: WorkloadOptions) -> int:
    """Open the accounts (retrying through faults); returns the total."""
    for account in accounts_of(options):
        for _ in range(100):

            async def open_account(t: Any, a: str = account) -> Any:
                return await t.bank.open_account(a, options.initial_balance)

            status, reason = await _transaction(cluster, open_account, 5.0)
            if status == "ok" or (status == "fail" and "already exists" in str(reason)):
                break
            await trio.sleep(0.2)
        else:
            raise RuntimeError(f"could not open {account}")
    return options.initial_balance * options.accounts


def _read_all(cluster: txrpc.Cluster, accounts: list[str]) -> Callable[[Any], Awaitable[dict[str, int]]]:
    """A transaction body reading every account: one call per shard."""
    by_shard: dict[str, list[str]] = {}
    for account in accounts:
        by_shard.setdefault(cluster.config.shard_map.primary_of(account).name, []).append(account)

    async def read_all(t: Any) -> dict[str, int]:
        found: dict[str, int] = {}
        for group in by_shard.values():
            found.update(await t.bank.balances(*group))
        return found

    return read_all


async def bank_client(
    cluster: txrpc.Cluster, history: History, process: int, rng: random.Random, options: WorkloadOptions, until: float
) -> None:
    accounts = accounts_of(options)
    while trio.current_time() < until:
        if rng.random() < options.read_p:
            await _recorded(cluster, history, process, "read", None, _read_all(cluster, accounts), options.tx_timeout_s)
        else:
            source, target = rng.sample(accounts, 2)
            amount = rng.randint(1, 5)
            transfer = {"from": source, "to": target, "amount": amount}
            invoke = history.invoke(process, "transfer", transfer, trio.current_time())

            async def move(t: Any, s: str = source, d: str = target, n: int = amount) -> None:
                await t.bank.withdraw(s, n)
                await t.bank.deposit(d, n)

            if options.concurrent_p and rng.random() < options.concurrent_p:
                part = rng.randint(0, amount)  # (a withdrawal of 0 still takes the lock)

                async def at_once(t: Any, s: str = source, d: str = target, n: int = amount, k: int = part) -> None:
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(t.bank.withdraw, s, k)
                            nursery.start_soon(t.bank.withdraw, s, n - k)
                            nursery.start_soon(t.bank.deposit, d, n)
                    except BaseExceptionGroup as group:  # the first failure (the others were cancelled by it)
                        while isinstance(group, BaseExceptionGroup):
                            group = group.exceptions[0]
                        raise group from None

                move = at_once

            status, reason = await _transaction(cluster, move, options.tx_timeout_s)
            outcome = transfer if status == "ok" else {**transfer, "error": str(reason)[:200]}
            history.complete(invoke, status, outcome, trio.current_time())  # type: ignore[arg-type]
        await trio.sleep(options.think_s * rng.uniform(0.5, 1.5))


async def bank_final_read(cluster: txrpc.Cluster, history: History, options: WorkloadOptions) -> dict[str, int] | None:
    """After the faults: one consistent read of every balance (retried), recorded."""
    accounts = accounts_of(options)
    for _ in range(50):
        status, value = await _recorded(cluster, history, 999, "read", None, _read_all(cluster, accounts), 5.0)
        if status == "ok":
            return dict(value)
        await trio.sleep(0.2)
    return None


async def list_append_client(
    cluster: txrpc.Cluster,
    history: History,
    process: int,
    rng: random.Random,
    options: WorkloadOptions,
    until: float,
    counter: list[int],
) -> None:
    keys = [f"k{i}" for i in range(options.keys)]
    while trio.current_time() < until:
        micro: list[list[Any]] = []
        for key in rng.sample(keys, rng.randint(1, 3)):
            if rng.random() < 0.5:
                counter[0] += 1
                micro.append(["append", key, counter[0]])
            else:
                micro.append(["r", key, None])

        async def body(t: Any, ops: list[list[Any]] = micro) -> list[list[Any]]:
            done = []
            for f, key, value in ops:
                if f == "append":
                    await t.la.append(key, value)
                    done.append([f, key, value])
                else:
                    done.append([f, key, list(await t.la.read(key))])
            return done

        await _recorded(cluster, history, process, "txn", micro, body, options.tx_timeout_s, unsettled=micro)
        await trio.sleep(options.think_s * rng.uniform(0.5, 1.5))


async def list_append_final_read(cluster: txrpc.Cluster, history: History, options: WorkloadOptions) -> bool:
    keys = [f"k{i}" for i in range(options.keys)]
    for _ in range(50):
        micro: list[list[Any]] = [["r", key, None] for key in keys]

        async def body(t: Any) -> list[list[Any]]:
            return [["r", key, list(await t.la.read(key))] for key in keys]

        status, _ = await _recorded(cluster, history, 999, "txn", micro, body, 5.0, unsettled=micro)
        if status == "ok":
            return True
        await trio.sleep(0.2)
    return False


# --------------------------------------------------------------------------- idempotency

#: Where the idempotency workload's server listens in the simulated network.
KEYED_SERVER = ("keyed", "10.0.2.1", 7000)
EXECUTIONS_PREFIX = "exec:"
EXECUTION_SEPARATOR = "@"  # counter.mark: one mark per execution, "exec:<key>@<n>"


def counter_service() -> txrpc.Service:
    """``counter.incr(name)``: a keyed call whose every execution leaves a durable mark
    (in ``current_call().store``, committed with the request-log record), so the marks
    count executions that took effect. ``counter.mark(name)`` does the same from a plain
    function — a handler that cannot suspend, which the server runs inside the request
    log's batch (one write: ``specs/guarantees.md``) — with a mark of its own per
    execution (it cannot read the store: a read would suspend)."""
    counter = txrpc.Service("counter")
    executions = itertools.count(1)  # (kept across the server's restarts: one per run)

    @counter.method
    def mark(name: str) -> int:
        call = txrpc.current_call()
        number = next(executions)
        call.store.put(f"{EXECUTIONS_PREFIX}{call.idempotency_key}{EXECUTION_SEPARATOR}{number}", 1)
        return number

    @counter.method
    async def incr(name: str) -> int:
        call = txrpc.current_call()
        mark = EXECUTIONS_PREFIX + str(call.idempotency_key)
        executed = int(await call.store.get(mark, 0)) + 1
        call.store.put(mark, executed)
        return executed

    return counter


async def keyed_client(
    history: History, process: int, rng: random.Random, options: WorkloadOptions, until: float
) -> None:
    """Calls ``counter.incr`` and ``counter.mark`` in turn, with a fresh key per operation,
    retrying it (same key) when the answer is lost — exactly what idempotency keys are for."""
    _, host, port = KEYED_SERVER
    client = txrpc.connect(host, port, connect_now=False, rng=random.Random(rng.random()))
    async with client:
        n = 0
        while trio.current_time() < until:
            n += 1
            key = f"p{process}-{n}"
            method = "counter.mark" if n % 2 == 0 else "counter.incr"
            invoke = history.invoke(process, method.removeprefix("counter."), {"key": key}, trio.current_time())
            status = "info"
            for _attempt in range(6):
                try:
                    await client.options(idempotency_key=key, timeout=0.5, wait=True).call(method, "x")
                    status = "ok"
                    break
                except (txrpc.RpcError, trio.TooSlowError):
                    await trio.sleep(0.1 * rng.uniform(0.5, 1.5))
            history.complete(invoke, status, {"key": key}, trio.current_time())  # type: ignore[arg-type]
            await trio.sleep(options.think_s * rng.uniform(0.5, 1.5))


def record_executions(history: History, database_dir: Any) -> int:
    """Read the durable execution marks of the counter service's database and record
    one ``execute`` op per execution (see ``check_idempotency``); returns how many."""
    import sqlalchemy as sa

    from storage import open_engine
    from storage._schema import kv

    engine = open_engine(database_dir, create=False)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(kv.c.key, kv.c.value).where(kv.c.key.like(EXECUTIONS_PREFIX + "%"))).all()
    finally:
        engine.dispose()
    from txrpc._codec import decode_value

    executions = 0
    for key, value in sorted(rows):
        idempotency_key = key[len(EXECUTIONS_PREFIX) :].split(EXECUTION_SEPARATOR)[0]
        for _ in range(int(decode_value(value))):
            history.record(-1, "execute", {"key": idempotency_key}, 0.0)
            executions += 1
    return executions
