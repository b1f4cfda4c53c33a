"""What each process of the many-process race tests runs (real processes, spawned: each its own
interpreter and its own connections to the store).

A spawned process imports the module of the function it runs. Here that module imports nothing
but the store it races on, imported inside the function; with the function in the test module,
each process also imported pytest and the rest of the test module's imports, about a third of
its start-up on 2 cores, times 4 to 6 processes per test and backend.
"""

from __future__ import annotations


def open_queue_at_the_barrier(root: str, state, barrier, out) -> None:
    """Wait for the others, open the review queue (migrating it if no one has), report the
    migrations this process applied, or its error."""
    try:
        from pathlib import Path

        from policies.review_queue import ReviewQueue

        barrier.wait(timeout=120)
        queue = ReviewQueue(Path(root), state=state)
        out.put(("applied", list(queue.schema.applied)))
        queue.close()
    except BaseException as error:  # reported in the parent
        out.put(("error", repr(error)))


def reserve_at_the_barrier(path: str, state, rules, reserve: dict, barrier, out) -> None:
    """Open the ledger, wait for the others, ``ledger.reserve(rules, **reserve)`` once, report
    (id, replayed), or the error."""
    try:
        from policies.budgets import BudgetLedger

        ledger = BudgetLedger(path, state)
        barrier.wait(timeout=120)
        got = ledger.reserve(rules, **reserve)
        out.put(("ok", got.id, got.replayed))
        ledger.close()
    except BaseException as error:  # reported in the parent
        out.put(("error", repr(error), None))


def reserve_repeatedly(path: str, rules, times: int, out) -> None:
    """Reserve 1 unit ``times`` times on the SQLite ledger at ``path``; report how many were granted."""
    from policies.budgets import BudgetExhausted, BudgetLedger

    ledger, granted = BudgetLedger(path), 0
    for _ in range(times):
        try:
            ledger.reserve(rules, tenant="t", feature="classify", tier="onnx", units=1)
            granted += 1
        except BudgetExhausted:
            pass
    out.put(granted)
