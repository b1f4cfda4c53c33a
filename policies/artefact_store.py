"""Calibration artefacts built from production, versioned by sha256, and the jobs that build them.

Every replica opens the same database (SQLite for one node, PostgreSQL for a cluster, as
policies/rollout_store.py), so an artefact written by one node's recalibration job can be named
by a rollout and loaded by every replica at run time, with no redeploy. An artefact is a JSON
object stored as its canonical text (sorted keys, no spaces) under the sha256 of that text;
``get`` recomputes the digest and refuses a body that no longer matches it, so a replica never
serves thresholds other than the ones the job certified.

The jobs table holds each recalibration's status (running, succeeded, refused with the reason,
failed with the reason) for admins. ``job_lock`` makes one node run a task's job at a time: a
session-level advisory lock on PostgreSQL (``pg_try_advisory_lock`` on a connection held for the
whole job, released with it or when that connection dies), a lease row on SQLite (one node, but
several replica processes).

The incumbents table names, per task, the artefact that a promoted rollout made the task's
incumbent (``adopt``): every replica serves its thresholds in place of the configured ones they
were certified from, across restarts, and the next recalibration certifies against it
(router/services/recalibration.py ``incumbent_artefact``). A later rollout's artefact replaces
it; an earlier one never does (``started_at`` orders them), so replicas that adopt late agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from visionroute.errors import Conflict, NotFound
from visionroute.migrations import Migration, migrate
from visionroute.redaction import shown
from visionroute.state import StateConfig, lock_id, open_database

STORE = "artefacts"
JOB_STATUSES = ("running", "succeeded", "refused", "failed")
LEASE_S = 3600.0  # SQLite: a lease left by a crashed process frees itself after this

MIGRATIONS = (
    Migration(
        1,
        "calibration artefacts by sha256, recalibration jobs, job leases (SQLite)",
        """
CREATE TABLE IF NOT EXISTS calibration_artefacts (
    sha256 TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    tenant TEXT,
    version TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calibration_artefacts_task ON calibration_artefacts (task, created_at);
CREATE TABLE IF NOT EXISTS recalibration_jobs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    tenant TEXT,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    artefact_sha256 TEXT,
    rollout_id TEXT,
    details_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recalibration_jobs_task ON recalibration_jobs (task, created_at);
CREATE TABLE IF NOT EXISTS job_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
""",
    ),
    Migration(
        2,
        "the artefact each task's promoted rollout made its incumbent",
        """
CREATE TABLE IF NOT EXISTS incumbent_artefacts (
    task TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    adopted_at REAL NOT NULL,
    adopted_by TEXT NOT NULL
);
""",
    ),
)


def _json_safe(value: Any) -> Any:
    """Infinities as the strings "inf"/"-inf" (as RiskCertificate.to_dict writes them); NaN refused."""
    if isinstance(value, float):
        if math.isnan(value):
            raise ValueError("an artefact may not hold NaN")
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(_json_safe(body), sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ArtefactCorrupted(ValueError):
    """A stored body whose sha256 is not its key: never served."""


class ArtefactStore:
    def __init__(self, path: str | Path, state: StateConfig | None = None) -> None:
        self.path = Path(path).expanduser()
        self.database = open_database(state, STORE, self.path)
        self.schema = migrate(self.database, STORE, MIGRATIONS)

    def close(self) -> None:
        self.database.close()

    # -- artefacts --------------------------------------------------------------------------

    def put(self, body: dict[str, Any], *, actor: str) -> str:
        """Store an artefact (``task``, ``version`` required); returns its sha256. Idempotent."""
        text = canonical(body)
        digest = sha256_of(text)
        with self.database.write() as tx:
            tx.execute(
                "INSERT INTO calibration_artefacts (sha256, task, tenant, version, body, created_at, created_by)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (digest, body["task"], body.get("tenant"), body["version"], text, time.time(), actor),
            )
        return digest

    def get(self, sha256: str) -> dict[str, Any]:
        """The artefact, its sha256 checked; NotFound, or ArtefactCorrupted on a mismatch."""
        with self.database.read() as conn:
            row = conn.execute(
                "SELECT body FROM calibration_artefacts WHERE sha256 = ?", (sha256,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no calibration artefact {shown(sha256)}", field="artefact")
        if sha256_of(row["body"]) != sha256:
            raise ArtefactCorrupted(f"calibration artefact {sha256}: stored body does not match its sha256")
        return json.loads(row["body"])

    def list(self, task: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql, params = (
            "SELECT sha256, task, tenant, version, created_at, created_by FROM calibration_artefacts",
            [],
        )
        if task is not None:
            sql, params = sql + " WHERE task = ?", [task]
        with self.database.read() as conn:
            rows = conn.execute(sql + " ORDER BY created_at DESC LIMIT ?", (*params, limit)).fetchall()
        return [{key: row[key] for key in row.keys()} for row in rows]

    # -- incumbents ---------------------------------------------------------------------------

    def adopt(self, task: str, sha256: str, *, rollout_id: str, started_at: float, actor: str) -> None:
        """Make a stored artefact of ``task`` its incumbent (a promoted rollout's). Idempotent; an
        artefact of a rollout started before the current incumbent's never replaces it."""
        body = self.get(sha256)  # stored and sha256-checked, or NotFound / ArtefactCorrupted
        if body.get("task") != task:
            raise ValueError(
                f"calibration artefact {sha256[:12]} is for task {body.get('task')!r}, not {task!r}"
            )
        with self.database.write() as tx:
            tx.execute(
                "INSERT INTO incumbent_artefacts (task, sha256, rollout_id, started_at, adopted_at, adopted_by)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (task) DO UPDATE SET sha256 = excluded.sha256,"
                " rollout_id = excluded.rollout_id, started_at = excluded.started_at,"
                " adopted_at = excluded.adopted_at, adopted_by = excluded.adopted_by"
                " WHERE incumbent_artefacts.started_at < excluded.started_at",
                (task, sha256, rollout_id, started_at, time.time(), actor),
            )

    def incumbents(self) -> dict[str, dict[str, Any]]:
        """task -> its incumbent artefact's row (sha256, rollout_id, started_at, adopted_at, adopted_by)."""
        with self.database.read() as conn:
            rows = conn.execute("SELECT * FROM incumbent_artefacts").fetchall()
        return {row["task"]: {key: row[key] for key in row.keys()} for row in rows}

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, *, task: str, tenant: str | None, actor: str, reason: str = "running") -> str:
        job_id = f"rc_{uuid.uuid4().hex[:16]}"
        now = time.time()
        with self.database.write() as tx:
            tx.execute(
                "INSERT INTO recalibration_jobs (id, task, tenant, status, reason, actor, created_at, updated_at,"
                " details_json) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, '{}')",
                (job_id, task, tenant, reason, actor, now, now),
            )
        return job_id

    def finish_job(
        self,
        job_id: str,
        status: str,
        reason: str,
        *,
        artefact_sha256: str | None = None,
        rollout_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if status not in JOB_STATUSES:
            raise ValueError(f"status must be one of {JOB_STATUSES}, got {status!r}")
        with self.database.write() as tx:
            tx.execute(
                "UPDATE recalibration_jobs SET status = ?, reason = ?, updated_at = ?, artefact_sha256 = ?,"
                " rollout_id = ?, details_json = ? WHERE id = ?",
                (status, reason, time.time(), artefact_sha256, rollout_id, canonical(details or {}), job_id),
            )

    def job(self, job_id: str) -> dict[str, Any]:
        with self.database.read() as conn:
            row = conn.execute("SELECT * FROM recalibration_jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no recalibration job {shown(job_id)}", field="job_id")
        return _job(row)

    def jobs(self, task: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM recalibration_jobs", []
        if task is not None:
            sql, params = sql + " WHERE task = ?", [task]
        with self.database.read() as conn:
            rows = conn.execute(sql + " ORDER BY created_at DESC LIMIT ?", (*params, limit)).fetchall()
        return [_job(row) for row in rows]

    @contextmanager
    def job_lock(self, name: str) -> Iterator[None]:
        """Held for the whole job by one node; Conflict when another holds it."""
        if self.database.dialect.name == "postgres":
            key = lock_id(f"recalibration:{name}")
            with self.database.read() as conn:  # autocommit: the lock is the session's, not a transaction's
                got = conn.execute("SELECT pg_try_advisory_lock(?) AS got", (key,)).fetchone()["got"]
                if not got:
                    raise Conflict(
                        f"a recalibration of {name!r} is already running on another node", field="task"
                    )
                try:
                    yield
                finally:
                    conn.execute("SELECT pg_advisory_unlock(?)", (key,))
            return
        holder, now = uuid.uuid4().hex, time.time()
        with self.database.write() as tx:
            row = tx.execute("SELECT holder, expires_at FROM job_leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row["expires_at"] > now:
                raise Conflict(f"a recalibration of {name!r} is already running", field="task")
            tx.execute(
                "INSERT INTO job_leases (name, holder, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                (name, holder, now + LEASE_S),
            )
        try:
            yield
        finally:
            with self.database.write() as tx:
                tx.execute("DELETE FROM job_leases WHERE name = ? AND holder = ?", (name, holder))


def _job(row: Any) -> dict[str, Any]:
    out = {key: row[key] for key in row.keys() if key != "details_json"}
    out["details"] = json.loads(row["details_json"])
    return out
