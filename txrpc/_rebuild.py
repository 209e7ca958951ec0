"""Rebuilding a shard's state from its commit log (``txrpc replay --shard``).

A shard's commit log holds, in log-position order, every write set it applied: its own
commits as a primary, replicated commits as a follower (negative transaction ids), and
catch-up snapshot rows (transaction id 0). Applying the entries in order to an empty
store must give exactly the shard's committed state: :func:`rebuild_shard` does that
and compares the digests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import storage
from storage import ShardStore

PAGE_ENTRIES = 1000


@dataclass
class RebuildResult:
    entries: int
    source_digest: str
    rebuilt_digest: str

    @property
    def matches(self) -> bool:
        return self.source_digest == self.rebuilt_digest


class TargetNotEmpty(Exception):
    """The store to rebuild into already holds data of that shard."""


async def rebuild_shard(
    source: str | os.PathLike[str],
    shard: str,
    into: str | os.PathLike[str],
    *,
    on_progress: Callable[[int], None] | None = None,
) -> RebuildResult:
    """Apply ``shard``'s commit log from ``source`` (not modified) to the empty store
    ``into``, in log order; return the entry count and both digests."""
    async with storage.open_storage(source, create=False) as src, storage.open_storage(into) as dst:
        original = ShardStore(src.database, src.appender, shard)
        rebuilt = ShardStore(dst.database, dst.appender, shard)
        await rebuilt.open()
        applied = 0
        since = 0
        not_empty = bool(await rebuilt.items())
        while not not_empty:
            entries = await original.log_entries(since, PAGE_ENTRIES)
            if not entries:
                break
            for _position, txid, writes in entries:
                await rebuilt.apply_commit(txid, writes)
                applied += 1
            since = entries[-1][0]
            if on_progress is not None:
                on_progress(applied)
        _, source_digest = await original.digest()
        _, rebuilt_digest = await rebuilt.digest()
    if not_empty:  # raised here, not inside the storage's task group (no exception group)
        raise TargetNotEmpty(f"{into} already holds data of shard {shard!r}: rebuild into an empty store")
    return RebuildResult(applied, source_digest, rebuilt_digest)
