"""`txrpc replay --shard`: a shard's commit log rebuilds its committed state."""

from __future__ import annotations

from pathlib import Path

import pytest

import storage
from storage import ShardStore
from storage._shard_store import apply_writes
from txrpc._rebuild import TargetNotEmpty, rebuild_shard


async def fill(path: Path) -> None:
    async with storage.open_storage(path) as opened:
        store = ShardStore(opened.database, opened.appender, "a")
        await store.open()
        await store.apply_commit(1, [("k1", False, 1), ("k2", False, {"x": [1, 2]})])
        await store.apply_commit(-2049, [("k1", False, 2)])  # a replicated commit
        await store.apply_commit(0, [("k3", False, "snap"), ("k2", True, None)])  # a catch-up snapshot page
        await store.apply_commit(7, [("k3", True, None), ("k4", False, b"\x00")])


async def test_the_commit_log_rebuilds_the_state(tmp_path: Path) -> None:
    await fill(tmp_path / "src")
    result = await rebuild_shard(tmp_path / "src", "a", tmp_path / "dst")
    assert result.entries == 4 and result.matches
    async with storage.open_storage(tmp_path / "dst") as opened:
        assert await ShardStore(opened.database, opened.appender, "a").items() == {"k1": 2, "k4": b"\x00"}
    with pytest.raises(TargetNotEmpty):
        await rebuild_shard(tmp_path / "src", "a", tmp_path / "dst")


async def test_state_the_log_does_not_explain_is_a_mismatch(tmp_path: Path) -> None:
    await fill(tmp_path / "src")
    async with storage.open_storage(tmp_path / "src") as opened:
        # A write that bypassed the commit log (damage, or a bug): the digests differ.
        await opened.database.write(lambda conn: apply_writes(conn, "a", [("k9", False, 9)]))
    result = await rebuild_shard(tmp_path / "src", "a", tmp_path / "dst")
    assert not result.matches
