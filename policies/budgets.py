"""Budgets: hard caps on cost units per tenant and feature over a time window.

Every expensive call first *reserves* its cost in the ledger, inside one write transaction that
reads what the window has used and inserts the reservation. On SQLite (one node) that is a
``BEGIN IMMEDIATE`` transaction, which serialises every writer of the file; on PostgreSQL (any
number of nodes) the transaction first takes an advisory lock per matching budget window, in
sorted order, so reservations for the same window on any node run one after another. Either
way the sum of reservations in a window can never pass the cap, however many requests race. After
the call the reservation is *settled* at the actual cost (or *released* when the call did not
run). A reservation never settled (the process died mid-call) keeps counting: the ledger errs
on the side of not overspending.

Windows are fixed and aligned to the epoch (``floor(now / window_s) * window_s``), so
``Retry-After`` is exact: the seconds until the window rolls over.

A rule matches a call by tenant, feature (the task, e.g. ``classify``) and tier; ``"*"`` matches
anything and the cap is shared by everything it matches. When a reservation does not fit, the
rule's ``degrade`` mode says what the request gets instead (applied by the caller):
``accept_degraded`` (the cheap answer, flagged degraded), ``review`` (a human decides) or
``reject`` (HTTP 429 with Retry-After).

Retries charge once. A client resends a request under the same ``X-Request-Id`` (the client's
retries, a resend after a crash, a batch rerun), so a reservation with a request id is keyed on
(tenant, feature, tier, request id) per budget (schema version 2, a unique index). ``reserve``
with a key that already has a reservation returns that reservation as it stands (its units, its
state, ``replayed`` set) and charges nothing: a settled one stays settled; one still
``reserved`` (the first send in flight, or a process that died) is the first send's to settle
or release, so the replay comes back done. A *released* reservation left no row (the call did
not run), so a retry of it is charged as a new call when it runs. Race-free: the reserving
transaction also holds the key's lock (SQLite: the file's write lock; PostgreSQL: an advisory
lock on the key, taken with the window locks in one sorted order), and the unique index is the
backstop (``INSERT ... ON CONFLICT DO NOTHING``; a lost insert rolls back and reads the winner).
A key lasts as long as its rows: after ``prune`` drops its window, or after an erasure clears
its request id (router/services/erasure.py, deliberately), a retry is a new charge. Without a
request id every call is charged. Rows written at schema version 1 carry no tenant, feature or
tier and so never match a key: a retry that straddles the upgrade is charged once more.

Usage totals (per tenant, feature and tier: reports and /metrics; no cap reads them) of a call no
rule covers are deferred on the request path (``settle_later``): added in memory and written for
all calls within ``USAGE_FLUSH_S`` in one transaction, so such a call writes nothing while its
request waits. A kill -9 may lose that last second of totals; every reservation row stays durable.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.costs import TIERS, Tier
from visionroute.errors import BudgetExceeded, InputError
from visionroute.migrations import Migration, migrate
from visionroute.state import Connection, SqliteDatabase, StateConfig, open_database

log = logging.getLogger("visionroute.budgets")

DegradeMode = Literal["accept_degraded", "review", "reject"]
_EPS = 1e-9  # float slack when comparing sums of units with the cap
USAGE_FLUSH_S = 1.0  # a deferred usage total (``settle_later``) is written within this long

STORE = "budget_ledger"
# The ledger's schema, one version at a time (visionroute/migrations.py applies them at open).
MIGRATIONS = (
    Migration(
        1,
        "reservations per budget window and usage per tenant, feature and tier",
        """
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT NOT NULL,
    budget TEXT NOT NULL,
    window_start REAL NOT NULL,
    window_end REAL NOT NULL,
    units REAL NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    request_id TEXT,
    PRIMARY KEY (id, budget)
);
CREATE INDEX IF NOT EXISTS reservations_window ON reservations (budget, window_start);
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL,
    feature TEXT NOT NULL,
    tier TEXT NOT NULL,
    units REAL NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (tenant, feature, tier)
);
""",
    ),
    Migration(
        2,
        "idempotent reservations: tenant, feature and tier on each row; one per request id, budget and tier",
        # Rows from version 1 keep NULLs here, and NULLs never collide in a unique index, so the
        # index cannot fail on an existing ledger. Erasure nulls request_id: the key goes with it.
        """
ALTER TABLE reservations ADD COLUMN tenant TEXT;
ALTER TABLE reservations ADD COLUMN feature TEXT;
ALTER TABLE reservations ADD COLUMN tier TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS reservations_request
    ON reservations (tenant, feature, tier, request_id, budget);
""",
    ),
)


class BudgetRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    tenant: str = Field("*", min_length=1, description="a tenant, or '*' for all tenants together")
    feature: str = Field("*", min_length=1, description="a task (e.g. classify), or '*' for all")
    tiers: list[Tier] = Field(
        default_factory=lambda: list(TIERS), min_length=1, description="which calls it meters"
    )
    window_s: float = Field(..., gt=0, le=366 * 86400)
    cap_units: float = Field(..., ge=0)
    degrade: DegradeMode = "reject"

    @model_validator(mode="after")
    def _consistent(self) -> BudgetRule:
        if self.degrade == "review" and "review" in self.tiers:
            raise ValueError(
                f"budget {self.name!r}: degrade mode 'review' cannot apply when the budget also meters the "
                "review tier (there would be nothing left to pay the reviewer); drop 'review' from tiers "
                "or pick accept_degraded / reject"
            )
        return self

    def matches(self, tenant: str, feature: str, tier: str) -> bool:
        return self.tenant in ("*", tenant) and self.feature in ("*", feature) and tier in self.tiers

    def window_start(self, now: float) -> float:
        return math.floor(now / self.window_s) * self.window_s


class BudgetExhausted(BudgetExceeded):
    """A reservation did not fit; carries the rule so the caller can apply its degrade mode."""

    def __init__(self, message: str, *, rule: BudgetRule, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s, field=f"budget:{rule.name}")
        self.rule = rule


@dataclass
class Reservation:
    id: str
    tenant: str
    feature: str
    tier: str
    units: float
    budgets: list[str] = field(default_factory=list)
    done: bool = False
    # A retry's reservation: the one its request id already had (settled or in flight), charged
    # nothing again; ``state`` is that reservation's (``reserved`` or ``settled``).
    replayed: bool = False
    state: str = "reserved"


class _LostInsert(Exception):
    """Another transaction inserted this request's reservation first: roll back, read it."""


class BudgetLedger:
    """The shared ledger: one SQLite file per node, or one PostgreSQL schema for the whole cluster.

    Any number of processes (and, on PostgreSQL, nodes) may open it at once.
    """

    def __init__(self, path: str | Path, state: StateConfig | None = None) -> None:
        self.path = Path(path).expanduser()
        # synchronous=FULL (SQLite) / synchronous_commit=on (PostgreSQL) for every reservation row:
        # a reservation lost in a crash could mean overspend.
        self.database = open_database(state, "budgets", self.path)
        self.schema = migrate(self.database, STORE, MIGRATIONS)
        # Usage-only settles commit without waiting for fsync (see settle): on SQLite through a
        # second set of per-thread connections, so the relaxed setting never touches a reservation.
        self._usage_database = SqliteDatabase(self.path) if self.database.dialect.name == "sqlite" else None
        # usage totals of settles no rule covers, not yet written (settle_later): (tenant,
        # feature, tier) -> [units, calls]; bounded by the keys, not by the calls
        self._pending_usage: dict[tuple[str, str, str], list[float]] = {}
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # held while a flush moves totals from memory to rows
        self._flush_timer: threading.Timer | None = None
        self.usage_flush_s = USAGE_FLUSH_S

    def close(self) -> None:
        """Write the deferred usage totals (``settle_later``), then close the databases."""
        with self._pending_lock:
            timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()
        try:
            self.flush_usage()
        except Exception as exc:
            log.warning("budget ledger closing: deferred usage totals not written: %s", exc)
        self.database.close()
        if self._usage_database is not None:
            self._usage_database.close()

    @staticmethod
    def _used(conn: Connection, rule: BudgetRule, now: float) -> float:
        row = conn.execute(
            "SELECT COALESCE(SUM(units), 0) FROM reservations WHERE budget = ? AND window_start = ?",
            (rule.name, rule.window_start(now)),
        ).fetchone()
        return float(row[0])

    def reserve(
        self,
        rules: list[BudgetRule],
        *,
        tenant: str,
        feature: str,
        tier: str,
        units: float,
        request_id: str | None = None,
        now: float | None = None,
    ) -> Reservation:
        """Reserve ``units`` on every matching rule, all or nothing; raise BudgetExhausted if one is full.

        With a ``request_id`` that already has a reservation for this tenant, feature and tier,
        return that one (``replayed``, done) instead of charging again (the module docstring).
        """
        if tier not in TIERS:
            raise InputError(f"unknown tier {tier!r}; expected one of {list(TIERS)}", field="tier")
        if not units >= 0 or math.isinf(units):
            raise InputError(f"a reservation needs finite units >= 0, got {units}", field="units")
        now = time.time() if now is None else now
        matching = [rule for rule in rules if rule.matches(tenant, feature, tier)]
        reservation = Reservation(uuid.uuid4().hex, tenant, feature, tier, units, [r.name for r in matching])
        if not matching:
            return reservation
        # Two tries: the unique index can only turn away an insert whose key appeared after this
        # transaction looked (PostgreSQL, were the key lock bypassed); the second try reads it.
        for _ in range(2):
            try:
                return self._reserve(matching, reservation, request_id, now)
            except _LostInsert:
                continue
        raise RuntimeError(f"reservation of request {request_id!r} lost its insert twice")  # pragma: no cover

    def _reserve(
        self, matching: list[BudgetRule], reservation: Reservation, request_id: str | None, now: float
    ) -> Reservation:
        tenant, feature = reservation.tenant, reservation.feature
        tier, units = reservation.tier, reservation.units
        with self.database.write() as conn:
            # PostgreSQL runs writers concurrently: hold each budget window's lock before reading
            # its sum, so no two reservations (on any node) interleave read-then-insert, and the
            # request's own lock before looking its key up, so concurrent retries (even in two
            # windows) see each other. Sorted, so two calls sharing locks cannot deadlock. A
            # no-op on SQLite, whose write transaction already serialises every writer.
            locks = {f"budget:{r.name}:{r.window_start(now)}" for r in matching}
            if request_id is not None:
                locks.add("budget-request:" + "\x1f".join((tenant, feature, tier, request_id)))
            for lock in sorted(locks):
                conn.dialect.lock(conn, lock)
            if request_id is not None:
                existing = self._existing(conn, reservation, request_id)
                if existing is not None:
                    return existing
            for rule in matching:
                used = self._used(conn, rule, now)
                if used + units > rule.cap_units + _EPS:
                    retry_after = rule.window_start(now) + rule.window_s - now
                    raise BudgetExhausted(
                        f"budget {rule.name!r} (tenant {rule.tenant}, feature {rule.feature}) has used "
                        f"{used:.4g} of {rule.cap_units:.4g} units in its {rule.window_s:g} s window; this "
                        f"{tier} call needs {units:.4g}; the window resets in {retry_after:.0f} s",
                        rule=rule,
                        retry_after_s=retry_after,
                    )
            for r in matching:
                inserted = conn.execute(
                    "INSERT INTO reservations (id, budget, window_start, window_end, units, state, created_at,"
                    " request_id, tenant, feature, tier) VALUES (?, ?, ?, ?, ?, 'reserved', ?, ?, ?, ?, ?)"
                    " ON CONFLICT (tenant, feature, tier, request_id, budget) DO NOTHING",
                    (
                        reservation.id,
                        r.name,
                        r.window_start(now),
                        r.window_start(now) + r.window_s,
                        units,
                        now,
                        request_id,
                        tenant,
                        feature,
                        tier,
                    ),
                ).rowcount
                if inserted == 0:
                    raise _LostInsert  # rolls back this transaction's inserts
        return reservation

    @staticmethod
    def _existing(conn: Connection, reservation: Reservation, request_id: str) -> Reservation | None:
        """The reservation this tenant, feature and tier already hold under ``request_id``."""
        rows = conn.execute(
            "SELECT id, budget, units, state FROM reservations"
            " WHERE tenant = ? AND feature = ? AND tier = ? AND request_id = ? ORDER BY budget",
            (reservation.tenant, reservation.feature, reservation.tier, request_id),
        ).fetchall()
        if not rows:
            return None
        first = rows[0]
        return Reservation(
            first[0],
            reservation.tenant,
            reservation.feature,
            reservation.tier,
            float(first[2]),
            [row[1] for row in rows if row[0] == first[0]],
            done=True,
            replayed=True,
            state=first[3],
        )

    def settle(self, reservation: Reservation, actual_units: float | None = None) -> None:
        """Charge the actual cost (default: what was reserved) and add it to the usage totals.

        Charging more than was reserved would let a window pass its cap, so the charge against
        budgets is capped at the reservation; the usage totals record the true cost.
        """
        if reservation.done:
            return
        actual = reservation.units if actual_units is None else float(actual_units)
        if not reservation.budgets:
            # No budget rule matched, so no cap reads this call: only the usage totals change.
            with self._usage_transaction() as conn:
                self._add_usage(conn, reservation, actual)
            reservation.done = True
            return
        with self.database.write() as conn:
            conn.execute(
                "UPDATE reservations SET units = ?, state = 'settled' WHERE id = ?",
                (min(actual, reservation.units), reservation.id),
            )
            self._add_usage(conn, reservation, actual)
        reservation.done = True

    def settle_later(self, reservation: Reservation, actual_units: float | None = None) -> None:
        """``settle`` for the request path. A reservation no budget rule covers only adds to the
        usage totals, and no cap reads them (caps read reservation rows), so its total is added in
        memory and written with the others within ``usage_flush_s`` in one transaction (a timer
        thread), instead of a write transaction per call: the calls a rule covers, and every
        reservation row, are written as ``settle`` writes them. Readers in this process
        (``usage``) see deferred totals at once, other processes within ``usage_flush_s``. What
        a kill -9 may lose: the last ``usage_flush_s`` of those totals (a graceful stop writes
        them: ``close``, ``flush_usage``), as a power loss already could (``_usage_transaction``)."""
        if reservation.done:
            return
        if reservation.budgets:
            self.settle(reservation, actual_units)
            return
        actual = reservation.units if actual_units is None else float(actual_units)
        key = (reservation.tenant, reservation.feature, reservation.tier)
        with self._pending_lock:
            totals = self._pending_usage.setdefault(key, [0.0, 0])
            totals[0] += actual
            totals[1] += 1
            if self._flush_timer is None:
                self._start_flush_timer()
        reservation.done = True

    def flush_usage(self) -> None:
        """Write the deferred usage totals now, in one transaction; on failure they stay
        pending (and the error is raised)."""
        with self._flush_lock:  # usage() sees these totals either pending or written, never both
            with self._pending_lock:
                pending, self._pending_usage = self._pending_usage, {}
            if not pending:
                return
            try:
                with self._usage_transaction() as conn:
                    for (tenant, feature, tier), (units, calls) in pending.items():
                        self._add_totals(conn, tenant, feature, tier, units, int(calls))
            except BaseException:
                with self._pending_lock:  # back in, with what arrived meanwhile
                    for key, (units, calls) in pending.items():
                        totals = self._pending_usage.setdefault(key, [0.0, 0])
                        totals[0] += units
                        totals[1] += calls
                raise

    def _start_flush_timer(self) -> None:
        """(Under the pending lock.) One timer at a time; it writes what is pending then."""
        timer = threading.Timer(self.usage_flush_s, self._flush_on_timer)
        timer.daemon = True  # the process's exit never waits for it (close writes what is left)
        self._flush_timer = timer
        timer.start()

    def _flush_on_timer(self) -> None:
        with self._pending_lock:
            self._flush_timer = None
        try:
            self.flush_usage()
        except Exception as exc:  # the store is down: kept, tried again after another period
            log.warning(
                "deferred budget usage totals not written (retried in %g s): %s", self.usage_flush_s, exc
            )
            with self._pending_lock:
                if self._pending_usage and self._flush_timer is None:
                    self._start_flush_timer()

    def settle_many(self, settles: Sequence[tuple[Reservation, float | None]]) -> list[Exception | None]:
        """``settle(reservation, actual_units)`` for each, the ones no budget rule covers in one
        usage transaction (one commit instead of one each; the same rows, added one by one);
        the others each on their own. Each result is None, or the exception its settle alone
        would have raised; a failed shared transaction is retried settle by settle."""
        outcomes: list[Exception | None] = [None] * len(settles)
        shared = [
            i
            for i, (reservation, _) in enumerate(settles)
            if not reservation.done and not reservation.budgets
        ]
        if len(shared) > 1:
            try:
                with self._usage_transaction() as conn:
                    for i in shared:
                        reservation, actual_units = settles[i]
                        actual = reservation.units if actual_units is None else float(actual_units)
                        self._add_usage(conn, reservation, actual)
            except Exception as exc:  # rolled back: each on its own below
                log.info(
                    "one usage transaction for %d settles failed (%s); settling each alone", len(shared), exc
                )
            else:
                for i in shared:
                    settles[i][0].done = True
        for i, (reservation, actual_units) in enumerate(settles):
            try:
                self.settle(reservation, actual_units)  # done already: nothing to write
            except Exception as exc:
                outcomes[i] = exc
        return outcomes

    @contextmanager
    def _usage_transaction(self) -> Iterator[Connection]:
        """A write transaction whose commit waits for the log write, not for fsync: consistent
        after a crash, may lose the last usage totals on power loss. Every reservation row, which
        is what enforces a cap exactly, stays fully durable."""
        if self._usage_database is None:
            with self.database.write() as conn:
                # PostgreSQL's exact analogue of SQLite's synchronous=NORMAL, for this transaction only.
                conn.execute("SET LOCAL synchronous_commit = off")
                yield conn
            return
        with self._usage_database.read() as conn:
            conn.execute("PRAGMA synchronous=NORMAL")  # SQLite refuses it inside a transaction
        with self._usage_database.write() as conn:
            yield conn

    @classmethod
    def _add_usage(cls, conn: Connection, reservation: Reservation, actual: float) -> None:
        cls._add_totals(conn, reservation.tenant, reservation.feature, reservation.tier, actual, 1)

    @staticmethod
    def _add_totals(conn: Connection, tenant: str, feature: str, tier: str, units: float, calls: int) -> None:
        conn.execute(
            "INSERT INTO usage (tenant, feature, tier, units, calls) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (tenant, feature, tier) DO UPDATE"
            " SET units = usage.units + excluded.units, calls = usage.calls + excluded.calls",
            (tenant, feature, tier, units, calls),
        )

    def release(self, reservation: Reservation) -> None:
        """The call did not run: give the units back."""
        if reservation.done:
            return
        with self.database.write() as conn:
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))
        reservation.done = True

    # -- readers -------------------------------------------------------------------------------

    def status(self, rules: list[BudgetRule], now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        out = []
        with self.database.read() as conn:
            for rule in rules:
                used = self._used(conn, rule, now)
                start = rule.window_start(now)
                out.append(
                    {
                        **rule.model_dump(),
                        "used_units": used,
                        "remaining_units": max(0.0, rule.cap_units - used),
                        "window_start": start,
                        "resets_in_s": start + rule.window_s - now,
                    }
                )
        return out

    def usage(self) -> list[dict[str, Any]]:
        """The usage totals per tenant, feature and tier, this process's deferred ones included."""
        with self._flush_lock:
            with self.database.read() as conn:
                rows = conn.execute(
                    "SELECT tenant, feature, tier, units, calls FROM usage ORDER BY tenant, feature, tier"
                ).fetchall()
            with self._pending_lock:
                pending = {key: tuple(totals) for key, totals in self._pending_usage.items()}
        totals = {(row[0], row[1], row[2]): [row[3], row[4]] for row in rows}
        for key, (units, calls) in pending.items():
            found = totals.setdefault(key, [0.0, 0])
            found[0] += units
            found[1] += int(calls)
        return [
            dict(zip(("tenant", "feature", "tier", "units", "calls"), (*key, *totals[key])))
            for key in sorted(totals)
        ]

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Drop reservations of windows that ended more than ``older_than_s`` ago (usage totals stay)."""
        now = time.time() if now is None else now
        with self.database.write() as conn:
            cursor = conn.execute("DELETE FROM reservations WHERE window_end < ?", (now - older_than_s,))
            return cursor.rowcount
