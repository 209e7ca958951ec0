"""A bank whose accounts live on different shards; transfers are atomic across them.

Each method is transactional: it runs on the shard that owns its first argument (the
account) inside the caller's transaction.
"""

import txrpc

bank = txrpc.Service("bank")


@bank.transactional
async def open_account(tx, account: str, balance: int = 0) -> int:
    if await tx.get(account, for_update=True) is not None:
        raise txrpc.Abort(f"account {account} already exists")
    await tx.put(account, balance)
    return balance


@bank.transactional
async def balance(tx, account: str) -> int:
    value = await tx.get(account)
    if value is None:
        raise txrpc.Abort(f"no account {account}")
    return int(value)


@bank.transactional
async def withdraw(tx, account: str, amount: int) -> int:
    if amount <= 0:
        raise txrpc.Abort("amount must be positive")
    current = await tx.get(account, default=0, for_update=True)
    if current < amount:
        raise txrpc.Abort(f"insufficient funds in {account}: {current} < {amount}")
    await tx.put(account, current - amount)
    return current - amount


@bank.transactional
async def deposit(tx, account: str, amount: int) -> int:
    if amount <= 0:
        raise txrpc.Abort("amount must be positive")
    current = await tx.get(account, default=0, for_update=True)
    await tx.put(account, current + amount)
    return current + amount
