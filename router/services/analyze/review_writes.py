"""The review queue's writes of one replica, grouped (group commit): the enqueues that arrive
while a write is in flight go together in the next one (``ReviewQueue.enqueue_many``: one
transaction, one commit, instead of one each; the commit's fsync is most of an enqueue's cost).

Nothing waits for company: an enqueue that finds no write in flight starts one at once, alone.
Each caller still gets its own item, or its own error, only once its row is committed (the
durable write stays before the answer); a failed shared transaction is retried item by item by
``enqueue_many``, so one item's failure never becomes another's. The writes run on a worker
thread, one group at a time per replica (SQLite serialises its writers anyway).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from policies.review.items import ReviewItem
from policies.review_queue import ReviewQueue

MAX_GROUP = 32  # items in one transaction at most (a long transaction holds SQLite's write lock)


@dataclass(eq=False)
class _Waiting:
    item: dict[str, Any]
    future: asyncio.Future[ReviewItem]


@dataclass(eq=False)
class ReviewWrites:
    queue: ReviewQueue
    max_group: int = MAX_GROUP
    transactions: int = 0  # write calls made (tests and the bench read it)
    _waiting: list[_Waiting] = field(default_factory=list)
    _writer: asyncio.Task[None] | None = None

    async def enqueue(self, **item: Any) -> ReviewItem:
        """``ReviewQueue.enqueue(**item)``, in the next write with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._writer is not None and self._writer.get_loop() is not loop:
            self._writer, self._waiting = None, []  # another event loop's (tests): not ours to finish
        future: asyncio.Future[ReviewItem] = loop.create_future()
        self._waiting.append(_Waiting(item, future))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_waiting())
        return await future

    async def _write_waiting(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting[: self.max_group], self._waiting[self.max_group :]
            self.transactions += 1
            try:
                results = await asyncio.to_thread(self._write, [one.item for one in group])
            except BaseException as exc:  # e.g. cancelled with its replica: every caller hears it
                for one in group:
                    if not one.future.done():
                        one.future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            for one, result in zip(group, results, strict=True):
                if one.future.done():
                    continue
                if isinstance(result, Exception):
                    one.future.set_exception(result)
                else:
                    one.future.set_result(result)

    def _write(self, items: list[dict[str, Any]]) -> list[ReviewItem | Exception]:
        if len(items) == 1:  # alone: exactly the single-item write
            try:
                return [self.queue.enqueue(**items[0])]
            except Exception as exc:
                return [exc]
        return self.queue.enqueue_many(items)
