"""coordinator._batching.Rounds: per-destination rounds, one in flight at a time."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from coordinator._batching import Rounds


def test_one_round_in_flight_per_destination_the_rest_go_together_when_it_is_answered() -> None:
    sent: list[tuple[str, list[int]]] = []
    gates: dict[str, trio.Event] = {}
    refused: list[int] = []

    async def send(dest: str, message: list[int], answered: Callable[[], None]) -> None:
        sent.append((dest, message))
        gate = gates[dest] = trio.Event()
        await gate.wait()
        answered()
        await trio.sleep(1)  # (a resend after the answer does not hold the next round back)

    async def main() -> None:
        rounds: Rounds[int, list[int]] = Rounds(lambda items: [items], send, lambda d, items: refused.extend(items))
        async with trio.open_nursery() as nursery:
            rounds.put(nursery, "a", 1)
            rounds.put(nursery, "b", 10)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(sent) == [("a", [1]), ("b", [10])]  # no wait while nothing is in flight
            for item in (2, 3, 4):
                rounds.put(nursery, "a", item)
            await trio.testing.wait_all_tasks_blocked()
            assert len(sent) == 2  # "a" has a round unanswered: they queue
            gates["a"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert sent[2] == ("a", [2, 3, 4])  # together, as soon as it is answered
            nursery.cancel_scope.cancel()
        assert refused == []

    trio.run(main)


def test_a_round_that_ends_without_an_answer_still_lets_the_next_one_go() -> None:
    sent: list[list[int]] = []

    async def send(dest: str, message: list[int], answered: Callable[[], None]) -> None:
        sent.append(message)
        if message == [1]:
            await trio.sleep(0.01)
            return  # (never calls answered: the round's end releases it)
        answered()

    async def main() -> None:
        rounds: Rounds[int, list[int]] = Rounds(lambda items: [items], send, lambda d, items: None)
        async with trio.open_nursery() as nursery:
            rounds.put(nursery, "a", 1)
            await trio.testing.wait_all_tasks_blocked()
            rounds.put(nursery, "a", 2)
            with trio.fail_after(5):
                while len(sent) < 2:
                    await trio.sleep(0.005)
        assert sent == [[1], [2]]

    trio.run(main)


def test_items_that_cannot_be_sent_are_refused() -> None:
    refused: list[tuple[str, list[int]]] = []

    async def send(dest: str, message: list[int], answered: Callable[[], None]) -> None:
        raise AssertionError("nothing can be sent")

    async def main() -> None:
        def refuse(dest: str, items: list[int]) -> None:
            refused.append((dest, items))

        rounds: Rounds[int, list[int]] = Rounds(lambda items: [items], send, refuse)
        async with trio.open_nursery() as nursery:
            pass
        rounds.put(nursery, "a", 1)  # the nursery is closed
        assert refused == [("a", [1])]
        assert rounds.queued == {}

    trio.run(main)
