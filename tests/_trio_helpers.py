"""Small trio helpers for tests."""

from __future__ import annotations

import trio


async def a_real_cancelled() -> trio.Cancelled:
    """A genuine ``trio.Cancelled`` (it has no public constructor), as a stop raises it."""
    caught: trio.Cancelled | None = None
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            caught = exc
            raise
    assert caught is not None
    return caught
