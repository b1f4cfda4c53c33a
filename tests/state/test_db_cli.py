"""``visionroute db status|migrate|copy``: a SQLite deployment moved into PostgreSQL, verified."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "visionroute.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def serve_config(path: Path, workdir: Path, state: dict) -> Path:
    document = {
        "applications": [
            {
                "name": "visionroute",
                "import_path": "router.app:build_app",
                "args": {
                    "review": {"path": str(workdir / "review")},
                    "retrieval": {"enabled": True, "index_dir": str(workdir / "index")},
                    "state": state,
                },
            }
        ]
    }
    path.write_text(yaml.safe_dump(document))
    return path


def fill_sqlite_deployment(workdir: Path) -> dict:
    """Real state through the real stores: review items with images and labels, budget use,
    search items with tags."""
    from policies.budgets import BudgetLedger, BudgetRule
    from policies.review_queue import ReviewQueue
    from retrieval.schemas import ItemMetadata
    from retrieval.store import MetadataStore

    queue = ReviewQueue(workdir / "review")
    images = []
    for i in range(6):
        data = np.random.default_rng(i).integers(0, 255, 3000, dtype=np.uint8).tobytes()
        sha = hashlib.sha256(data).hexdigest()
        images.append(sha)
        queue.enqueue(
            request_id=f"r{i}",
            image_bytes=data,
            image_sha256=sha,
            tenant=f"t{i % 2}",
            task="classify",
            reason="low confidence",
            proposed=[{"label": "cat", "score": 0.4}],
            trace={"i": i},
            priority=i / 10,
        )
    claimed = queue.claim("ana")
    queue.submit_label(claimed.id, reviewer="ana", lease_token=claimed.lease_token, label={"label": "cat"})
    ledger = BudgetLedger(workdir / "review" / "budgets.sqlite3")
    rules = [BudgetRule(name="b", window_s=3600, cap_units=100)]
    for _ in range(3):
        ledger.settle(ledger.reserve(rules, tenant="t0", feature="classify", tier="onnx", units=2.0))
    from policies.rollout_store import RolloutStore
    from policies.sequential import RolloutConfig

    rollouts = RolloutStore(workdir / "review" / "rollouts.sqlite3")
    started = rollouts.start(
        task="classify",
        candidate="next",
        policy=None,
        mode="canary",
        fraction=0.5,
        sticky_by="tenant",
        audit_fraction=1.0,
        config=RolloutConfig(),
        actor="ana",
        reason="copy test",
    )
    rollouts.observe(started.id, "candidate", is_error=False, item_id="i1")
    store = MetadataStore(workdir / "index" / "items.sqlite")
    for i in range(5):
        store.upsert(
            None, np.full(8, i, np.float32), ItemMetadata(tenant="t0", source=f"s{i}", tags=[f"k{i}"])
        )
    store.delete(2)
    return {"images": images}


@pytest.mark.slow
def test_copy_moves_every_store_and_verifies_it(tmp_path, postgres_dsn):
    workdir = tmp_path / "deployment"
    fill_sqlite_deployment(workdir)
    sqlite_config = serve_config(tmp_path / "sqlite.yaml", workdir, {"backend": "sqlite"})
    pg_config = serve_config(tmp_path / "pg.yaml", workdir, {"backend": "postgres"})

    status = run_cli("db", "status", "--config", str(pg_config))
    assert status.returncode == 0, status.stderr
    assert {s["store"]: s["database_version"] for s in json.loads(status.stdout)["stores"]} == {
        "review": 0,
        "budgets": 0,
        "rollouts": 0,
        "search": 0,
    }

    copied = run_cli("db", "copy", "--from", str(sqlite_config), "--to", str(pg_config))
    assert copied.returncode == 0, copied.stderr
    report = {(r["store"], r["table"]): r for r in json.loads(copied.stdout)["copied"]}
    assert all(r["verified"] for r in report.values()), report
    assert report[("review", "items")]["rows"] == 6
    assert report[("review", "images")]["rows"] == 6
    assert report[("budgets", "reservations")]["rows"] == 3
    assert report[("search", "items")]["rows"] == 4
    assert (
        report[("rollouts", "rollouts")]["rows"] == 1 and report[("rollouts", "rollout_events")]["rows"] == 1
    )

    status = json.loads(run_cli("db", "status", "--config", str(pg_config)).stdout)
    assert all(s["state"] == "current" for s in status["stores"])

    # The service's own stores read the copy: the labelled item, the images, new ids after old ones.
    from policies.review_queue import ReviewQueue
    from retrieval.schemas import ItemMetadata
    from retrieval.store import MetadataStore
    from visionroute.state import StateConfig

    state = StateConfig(backend="postgres")
    queue = ReviewQueue(tmp_path / "elsewhere", state=state)
    assert queue.stats()["depth"] == 5  # six enqueued, one labelled
    for item in queue.list_items(limit=100):
        assert hashlib.sha256(queue.image(item.id)).hexdigest() == item.image_sha256
    store = MetadataStore(tmp_path / "elsewhere" / "items.sqlite", state=state, name="search")
    new_id, _, _ = store.upsert(None, np.ones(8, np.float32), ItemMetadata(tenant="t0"))
    assert new_id == 6  # identity columns continue after the copied ids
    queue.close()
    store.close()

    again = run_cli("db", "copy", "--from", str(sqlite_config), "--to", str(pg_config))
    assert again.returncode == 2 and "already holds rows" in again.stderr


def test_status_refuses_nothing_and_migrate_creates_the_schemas(tmp_path, postgres_dsn):
    pg_config = serve_config(tmp_path / "pg.yaml", tmp_path / "w", {"backend": "postgres"})
    migrated = run_cli("db", "migrate", "--config", str(pg_config))
    assert migrated.returncode == 0, migrated.stderr
    assert "review: schema version 0 -> " in migrated.stdout
    status = json.loads(run_cli("db", "status", "--config", str(pg_config)).stdout)
    assert status["backend"] == "postgres"
    assert all(s["database_version"] == s["release_version"] > 0 for s in status["stores"])


def test_a_missing_dsn_is_a_clear_error(tmp_path):
    pg_config = serve_config(
        tmp_path / "pg.yaml", tmp_path / "w", {"backend": "postgres", "dsn_env": "NO_SUCH_DSN"}
    )
    result = run_cli("db", "status", "--config", str(pg_config), env={"NO_SUCH_DSN": ""})
    assert result.returncode == 2
    assert "state.dsn_env" in result.stderr and "NO_SUCH_DSN" in result.stderr


def test_the_shipped_cluster_config_is_valid_and_says_where_its_state_lives():
    result = run_cli("check-config", str(REPO / "serve_config.cluster.yaml"), env={"VISIONROUTE_PG_DSN": ""})
    assert result.returncode == 0, result.stderr
    assert "state: PostgreSQL from $VISIONROUTE_PG_DSN (NOT SET here" in result.stdout
    result = run_cli("check-config", str(REPO / "serve_config.yaml"))
    assert "state: SQLite files" in result.stdout
