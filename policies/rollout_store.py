"""Durable rollout state shared by every replica: the rollouts, their evidence and their audit log.

A rollout runs a candidate (a model declared under ``cascades.<task>.candidates``, a policy set, a
calibration artefact stored by a recalibration job (``artefact``: its sha256), or a combination)
beside the task's incumbent, in ``shadow`` or ``canary`` mode. Its statistical state is a
``policies.sequential.RolloutMonitor`` serialised into the row; every change to it (an audit label,
a batch of cost observations, an operator's decision) happens inside one write transaction that
holds the rollout's lock, reads the row, updates the monitor and writes it back, so replicas on
any node add their evidence without losing each other's (the counts are order-free, see
policies/sequential.py).

At most one rollout per task is *in effect* (running, or promoted and not yet finished): the
``active_task`` column holds the task while it is, and is UNIQUE, so two concurrent starts cannot
both win. Every start, promotion, rollback and finish is written to ``rollout_events`` (who, when,
why, the evidence at that moment) in the same transaction as the change.

SQLite for one node, PostgreSQL for a cluster (visionroute/state.py); schema by
visionroute/migrations.py.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from policies.sequential import RolloutConfig, RolloutMonitor
from visionroute.errors import Conflict, InputError, NotFound
from visionroute.migrations import Migration, migrate
from visionroute.redaction import shown
from visionroute.state import Connection, StateConfig, open_database

STORE = "rollouts"
Mode = Literal["shadow", "canary"]
StickyBy = Literal["tenant", "request"]
STATUSES = ("running", "promoted", "rolled_back", "finished")
IN_EFFECT = ("running", "promoted")

MIGRATIONS = (
    Migration(
        1,
        "rollouts (one in effect per task), their audit log and shadow outcomes",
        """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    candidate TEXT,
    policy_json TEXT,
    mode TEXT NOT NULL,
    fraction REAL NOT NULL,
    sticky_by TEXT NOT NULL,
    audit_fraction REAL NOT NULL,
    status TEXT NOT NULL,
    monitor_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    updated_at REAL NOT NULL,
    active_task TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS rollouts_task ON rollouts (task, created_at);
CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    evidence_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id);
CREATE TABLE IF NOT EXISTS rollout_shadow (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT,
    at REAL NOT NULL,
    incumbent_decision TEXT,
    incumbent_score REAL,
    incumbent_cost REAL NOT NULL,
    candidate_decision TEXT,
    candidate_score REAL,
    candidate_cost REAL NOT NULL,
    candidate_answer_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_shadow_rollout ON rollout_shadow (rollout_id, id);
CREATE TABLE IF NOT EXISTS rollout_labels (
    item_id TEXT PRIMARY KEY,
    rollout_id TEXT NOT NULL,
    arm TEXT NOT NULL,
    is_error INTEGER NOT NULL,
    at REAL NOT NULL
);
""",
    ),
    Migration(
        2,
        "a rollout may name a stored calibration artefact (policies/artefact_store.py) by its sha256",
        "ALTER TABLE rollouts ADD COLUMN artefact TEXT;",
    ),
)


@dataclass(frozen=True)
class Rollout:
    """One rollout as stored; ``monitor`` holds its evidence and the test's decision."""

    id: str
    task: str
    candidate: str | None
    policy: dict[str, Any] | None
    mode: str
    fraction: float
    sticky_by: str
    audit_fraction: float
    status: str
    monitor: RolloutMonitor = field(compare=False)
    created_at: float
    created_by: str
    reason: str
    updated_at: float
    artefact: str | None = None  # sha256 of a stored calibration artefact: the candidate's thresholds

    @property
    def in_effect(self) -> bool:
        return self.status in IN_EFFECT

    @property
    def candidate_serves_all(self) -> bool:
        """Promoted: every request of the task goes to the candidate until the rollout is finished."""
        return self.status == "promoted"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "candidate": self.candidate,
            "artefact": self.artefact,
            "policy_version": (self.policy or {}).get("version"),
            "mode": self.mode,
            "fraction": self.fraction,
            "sticky_by": self.sticky_by,
            "audit_fraction": self.audit_fraction,
            "status": self.status,
            "serving": _serving(self),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "reason": self.reason,
            "updated_at": self.updated_at,
            "test": self.monitor.status(),
        }


def _serving(rollout: Rollout) -> str:
    if rollout.status == "running":
        return (
            f"incumbent; candidate in shadow on {rollout.fraction:.0%} of requests"
            if rollout.mode == "shadow"
            else f"candidate on {rollout.fraction:.0%} of {rollout.sticky_by}s, incumbent on the rest"
        )
    if rollout.status == "promoted":
        return "candidate on every request (make it the incumbent in the config, deploy, then finish the rollout)"
    return "incumbent"


def _rollout(row: Any) -> Rollout:
    return Rollout(
        id=row["id"],
        task=row["task"],
        candidate=row["candidate"],
        policy=json.loads(row["policy_json"]) if row["policy_json"] else None,
        mode=row["mode"],
        fraction=float(row["fraction"]),
        sticky_by=row["sticky_by"],
        audit_fraction=float(row["audit_fraction"]),
        status=row["status"],
        monitor=RolloutMonitor.from_json(row["monitor_json"]),
        created_at=float(row["created_at"]),
        created_by=row["created_by"],
        reason=row["reason"],
        updated_at=float(row["updated_at"]),
        artefact=row["artefact"],
    )


class RolloutStore:
    """The rollouts of one deployment (every replica opens the same database)."""

    def __init__(self, path: str | Path, state: StateConfig | None = None) -> None:
        self.path = Path(path).expanduser()
        self.database = open_database(state, STORE, self.path)
        self.schema = migrate(self.database, STORE, MIGRATIONS)

    def close(self) -> None:
        self.database.close()

    # -- reads ----------------------------------------------------------------------------------

    def get(self, rollout_id: str) -> Rollout:
        with self.database.read() as conn:
            row = conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise NotFound(f"no rollout {shown(rollout_id)}", field="rollout_id")
        return _rollout(row)

    def in_effect(self) -> list[Rollout]:
        """The rollouts that change how requests are served now (at most one per task)."""
        with self.database.read() as conn:
            rows = conn.execute("SELECT * FROM rollouts WHERE active_task IS NOT NULL").fetchall()
        return [_rollout(row) for row in rows]

    def list(self, task: str | None = None, limit: int = 50) -> list[Rollout]:
        sql, params = "SELECT * FROM rollouts", []
        if task is not None:
            sql, params = sql + " WHERE task = ?", [task]
        with self.database.read() as conn:
            rows = conn.execute(sql + " ORDER BY created_at DESC LIMIT ?", (*params, limit)).fetchall()
        return [_rollout(row) for row in rows]

    def events(self, rollout_id: str) -> list[dict[str, Any]]:
        with self.database.read() as conn:
            rows = conn.execute(
                "SELECT at, actor, action, reason, evidence_json FROM rollout_events WHERE rollout_id = ? ORDER BY id",
                (rollout_id,),
            ).fetchall()
        return [
            {
                "at": row["at"],
                "actor": row["actor"],
                "action": row["action"],
                "reason": row["reason"],
                "evidence": json.loads(row["evidence_json"]),
            }
            for row in rows
        ]

    def shadow_summary(self, rollout_id: str) -> dict[str, Any]:
        """How often the shadow candidate decided as the incumbent did, and its cost beside theirs."""
        with self.database.read() as conn:
            row = conn.execute(
                "SELECT COUNT(*) AS n, SUM(CASE WHEN incumbent_decision = candidate_decision THEN 1 ELSE 0 END) AS same,"
                " SUM(incumbent_cost) AS incumbent_cost, SUM(candidate_cost) AS candidate_cost,"
                " SUM(CASE WHEN candidate_decision = 'accept' THEN 1 ELSE 0 END) AS candidate_accepts"
                " FROM rollout_shadow WHERE rollout_id = ?",
                (rollout_id,),
            ).fetchone()
        n = int(row["n"] or 0)
        return {
            "requests": n,
            "same_decision": int(row["same"] or 0),
            "candidate_accepts": int(row["candidate_accepts"] or 0),
            "incumbent_cost_units": float(row["incumbent_cost"] or 0.0),
            "candidate_cost_units": float(row["candidate_cost"] or 0.0),
        }

    def shadow_records(self, rollout_id: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.database.read() as conn:
            rows = conn.execute(
                "SELECT * FROM rollout_shadow WHERE rollout_id = ? ORDER BY id DESC LIMIT ?",
                (rollout_id, limit),
            ).fetchall()
        return [
            {
                key: (json.loads(row[key]) if key == "candidate_answer_json" else row[key])
                for key in row.keys()
                if key != "id"
            }
            for row in rows
        ]

    # -- writes ---------------------------------------------------------------------------------

    def start(
        self,
        *,
        task: str,
        candidate: str | None,
        policy: dict[str, Any] | None,
        mode: Mode,
        fraction: float,
        sticky_by: StickyBy,
        audit_fraction: float,
        config: RolloutConfig,
        actor: str,
        reason: str,
        artefact: str | None = None,
    ) -> Rollout:
        """A new running rollout; Conflict (409) while another one is in effect for the task."""
        now = time.time()
        rollout_id = f"ro_{uuid.uuid4().hex[:16]}"
        monitor = RolloutMonitor(config)
        with self.database.write() as tx:
            tx.dialect.lock(tx, f"rollout-task:{task}")
            existing = tx.execute("SELECT id, status FROM rollouts WHERE active_task = ?", (task,)).fetchone()
            if existing is not None:
                raise Conflict(
                    f"rollout {existing['id']} is already {existing['status']} for task {task!r}; "
                    + (
                        "promote or roll it back first"
                        if existing["status"] == "running"
                        else "finish it (after deploying its candidate as the incumbent) or roll it back first"
                    ),
                    field="task",
                )
            tx.execute(
                "INSERT INTO rollouts (id, task, candidate, policy_json, mode, fraction, sticky_by, audit_fraction,"
                " status, monitor_json, created_at, created_by, reason, updated_at, active_task, artefact)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout_id,
                    task,
                    candidate,
                    json.dumps(policy, sort_keys=True) if policy is not None else None,
                    mode,
                    float(fraction),
                    sticky_by,
                    float(audit_fraction),
                    monitor.to_json(),
                    now,
                    actor,
                    reason,
                    now,
                    task,
                    artefact,
                ),
            )
            self._event(tx, rollout_id, actor, "start", reason, monitor, now)
        return self.get(rollout_id)

    def observe(
        self,
        rollout_id: str,
        arm: str,
        *,
        is_error: bool | None = None,
        cost_total: float = 0.0,
        cost_count: int = 0,
        item_id: str | None = None,
    ) -> Rollout:
        """Add one audit label and/or a batch of cost observations to an arm. While the rollout
        runs, the test's first promote or rollback takes effect here, audited as the monitor's.

        A label names its review ``item_id``: each item counts once, however often its label is
        submitted again (a reviewer's retry is a no-op success in the queue)."""
        if arm not in ("incumbent", "candidate"):
            raise InputError(f"arm must be 'incumbent' or 'candidate', got {arm!r}", field="arm")
        with self.database.write() as tx:
            row = self._locked(tx, rollout_id)
            monitor = RolloutMonitor.from_json(row["monitor_json"])
            if is_error is not None and item_id is not None:
                counted = tx.execute(
                    "INSERT INTO rollout_labels (item_id, rollout_id, arm, is_error, at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (item_id) DO NOTHING RETURNING item_id",
                    (item_id, rollout_id, arm, int(bool(is_error)), time.time()),
                ).fetchone()
                if counted is None:  # this item's label is already in the evidence
                    is_error = None
            before = monitor.decision
            if is_error is not None:
                monitor.observe(arm, is_error=bool(is_error))
            if cost_count:
                monitor.observe_costs(arm, cost_total, cost_count)
            now = time.time()
            status = row["status"]
            if status == "running" and before == "continue" and monitor.decision != "continue":
                status = "promoted" if monitor.decision == "promote" else "rolled_back"
                self._set_status(tx, rollout_id, status)
                self._event(tx, rollout_id, "sequential-test", monitor.decision, monitor.reason, monitor, now)
            tx.execute(
                "UPDATE rollouts SET monitor_json = ?, updated_at = ? WHERE id = ?",
                (monitor.to_json(), now, rollout_id),
            )
        return self.get(rollout_id)

    def decide(self, rollout_id: str, action: str, *, actor: str, reason: str) -> Rollout:
        """An operator's promote, rollback or finish; refused (409) where the status does not allow it."""
        allowed = {"promote": ("running",), "rollback": ("running", "promoted"), "finish": ("promoted",)}
        if action not in allowed:
            raise InputError(f"action must be one of {sorted(allowed)}, got {action!r}", field="action")
        target = {"promote": "promoted", "rollback": "rolled_back", "finish": "finished"}[action]
        with self.database.write() as tx:
            row = self._locked(tx, rollout_id)
            if row["status"] not in allowed[action]:
                raise Conflict(
                    f"rollout {rollout_id} is {row['status']}; {action} needs it to be "
                    + " or ".join(allowed[action]),
                    field="status",
                )
            self._set_status(tx, rollout_id, target)
            monitor = RolloutMonitor.from_json(row["monitor_json"])
            self._event(tx, rollout_id, actor, action, reason, monitor, time.time())
        return self.get(rollout_id)

    def record_shadow(self, rollout_id: str, record: dict[str, Any]) -> None:
        with self.database.write() as tx:
            tx.execute(
                "INSERT INTO rollout_shadow (rollout_id, request_id, tenant, at, incumbent_decision, incumbent_score,"
                " incumbent_cost, candidate_decision, candidate_score, candidate_cost, candidate_answer_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout_id,
                    record["request_id"],
                    record.get("tenant"),
                    time.time(),
                    record.get("incumbent_decision"),
                    record.get("incumbent_score"),
                    float(record.get("incumbent_cost", 0.0)),
                    record.get("candidate_decision"),
                    record.get("candidate_score"),
                    float(record.get("candidate_cost", 0.0)),
                    json.dumps(record.get("candidate_answer", []), sort_keys=True),
                ),
            )

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _locked(tx: Connection, rollout_id: str) -> Any:
        """The rollout's row, held for the rest of the transaction (NotFound when there is none)."""
        tx.dialect.lock(tx, f"rollout:{rollout_id}")
        row = tx.execute(
            "SELECT task, status, monitor_json FROM rollouts WHERE id = ?" + tx.dialect.for_update,
            (rollout_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no rollout {shown(rollout_id)}", field="rollout_id")
        return row

    @staticmethod
    def _set_status(tx: Connection, rollout_id: str, status: str) -> None:
        tx.execute(
            "UPDATE rollouts SET status = ?, updated_at = ?,"
            " active_task = CASE WHEN ? IN ('running', 'promoted') THEN task ELSE NULL END WHERE id = ?",
            (status, time.time(), status, rollout_id),
        )

    @staticmethod
    def _event(
        tx: Connection,
        rollout_id: str,
        actor: str,
        action: str,
        reason: str,
        monitor: RolloutMonitor,
        at: float,
    ) -> None:
        status = monitor.status()
        evidence = {"decision": status["decision"], "reason": status["reason"], "arms": status["arms"]}
        tx.execute(
            "INSERT INTO rollout_events (rollout_id, at, actor, action, reason, evidence_json) VALUES (?, ?, ?, ?, ?, ?)",
            (rollout_id, at, actor, action, reason, json.dumps(evidence, sort_keys=True, allow_nan=False)),
        )
