"""Writes of one replica, grouped (group commit): the writes that arrive while one is in
flight go together in the next one (one transaction, one commit, instead of one each; a
commit, and on SQLite its write lock, is most of what a small write costs). Used for the
review queue's items (``ReviewQueue.enqueue_many``); the budget ledger's usage-only settles
are deferred in memory instead (``BudgetLedger.settle_later``).

Nothing waits for company: a write that finds none in flight starts at once, alone. Each
caller still hears its own outcome, or its own error, only once its write is committed (a
durable write before the answer stays before the answer); the ``many`` functions retry a
failed shared transaction item by item, so one item's failure never becomes another's. The
writes run on a worker thread, one group at a time per replica (SQLite serialises its writers
anyway).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

MAX_GROUP = 32  # items in one transaction at most (a long transaction holds SQLite's write lock)


@dataclass(eq=False)
class _Waiting(Generic[Item, Outcome]):
    item: Item
    future: asyncio.Future[Outcome]


@dataclass(eq=False)
class GroupedWrites(Generic[Item, Outcome]):
    """``write_one(item)`` for a group of one (exactly the single write); ``write_many(items)``
    for more, returning each item's outcome or exception in order."""

    write_one: Callable[[Item], Outcome]
    write_many: Callable[[Sequence[Item]], Sequence[Outcome | Exception]]
    max_group: int = MAX_GROUP
    transactions: int = 0  # write calls made (tests and the bench read it)
    _waiting: list[_Waiting[Item, Outcome]] = field(default_factory=list)
    _writer: asyncio.Task[None] | None = None

    async def write(self, item: Item) -> Outcome:
        """``item``'s write, in the next group with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._writer is not None and self._writer.get_loop() is not loop:
            self._writer, self._waiting = None, []  # another event loop's (tests): not ours to finish
        future: asyncio.Future[Outcome] = loop.create_future()
        self._waiting.append(_Waiting(item, future))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_waiting())
        return await future

    async def _write_waiting(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting[: self.max_group], self._waiting[self.max_group :]
            self.transactions += 1
            try:
                outcomes = await asyncio.to_thread(self._write, [one.item for one in group])
            except BaseException as exc:  # e.g. cancelled with its replica: every caller hears it
                for one in group:
                    if not one.future.done():
                        one.future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            for one, outcome in zip(group, outcomes, strict=True):
                if one.future.done():
                    continue
                if isinstance(outcome, Exception):
                    one.future.set_exception(outcome)
                else:
                    one.future.set_result(outcome)

    def _write(self, items: list[Item]) -> Sequence[Outcome | Exception]:
        if len(items) == 1:  # alone: exactly the single write
            try:
                return [self.write_one(items[0])]
            except Exception as exc:
                return [exc]
        return self.write_many(items)


def review_writes(queue: Any) -> GroupedWrites[dict[str, Any], Any]:
    """The review queue's enqueues (``policies.review_queue.ReviewQueue``), grouped; items are
    ``enqueue``'s keyword arguments."""
    return GroupedWrites(lambda item: queue.enqueue(**item), lambda items: queue.enqueue_many(items))
