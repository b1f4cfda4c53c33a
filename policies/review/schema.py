"""The review store's schema: tables, versions and the columns of ``items``.

``MIGRATIONS`` lists the schema one version at a time; visionroute/migrations.py applies them
at open (``ReviewQueue``) and ``visionroute db`` reads them. A new version is a new entry at the
end, never an edit of one already released. Images live in the ``images`` table on
PostgreSQL (every node reads them) and as fsynced files on SQLite (``blobs``).
"""

from __future__ import annotations

from visionroute.migrations import Migration
from visionroute.state import Connection

STORE = "review_queue"
ITEM_COLUMNS = (
    "id, request_id, tenant, task, image_sha256, created_at, priority, reason, proposed_json, trace_json,"
    " status, lease_owner, lease_token, lease_expires_at, label_json, labelled_by, labelled_at, kind,"
    " sla_due_at, image_deleted_at"
)
# The columns versions 1 and 2 create ``items`` with after ``request_id`` (version 2 rebuilds the
# table to change that column's uniqueness). Released SQL: never edit; a new column is a new
# version's ALTER TABLE.
_ITEM_COLUMNS_AFTER_REQUEST_ID = """\
            tenant TEXT NOT NULL,
            task TEXT NOT NULL,
            image_sha256 TEXT NOT NULL,
            created_at REAL NOT NULL,
            priority REAL NOT NULL DEFAULT 0,
            reason TEXT NOT NULL,
            proposed_json TEXT NOT NULL,
            trace_json TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending',
            lease_owner TEXT,
            lease_token TEXT,
            lease_expires_at REAL,
            label_json TEXT,
            labelled_by TEXT,
            labelled_at REAL,
            kind TEXT NOT NULL DEFAULT 'review',
            sla_due_at REAL,
            image_deleted_at REAL"""

# The schema, one version at a time (visionroute/migrations.py applies them at open). Plain SQL;
# a new version is a new entry at the end, never an edit of one already released.
MIGRATIONS = (
    Migration(
        1,
        "items, label sets and the audit log (request_id unique across all tenants)",
        f"""
        CREATE TABLE IF NOT EXISTS items (
            id TEXT PRIMARY KEY,
            request_id TEXT UNIQUE NOT NULL,
{_ITEM_COLUMNS_AFTER_REQUEST_ID}
        );
        CREATE INDEX IF NOT EXISTS items_queue ON items (status, priority DESC, created_at);
        CREATE TABLE IF NOT EXISTS label_sets (
            task TEXT PRIMARY KEY,
            labels_json TEXT NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE IF NOT EXISTS audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            item_id TEXT NOT NULL,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            previous_json TEXT,
            new_json TEXT
        );
        """,
    ),
    Migration(
        2,
        "request ids are unique per (tenant, request_id, kind), not across tenants",
        # SQLite cannot drop a UNIQUE constraint: rebuild the table (its rows keep their ids).
        f"""
        CREATE TABLE items_v2 (
            id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL,
{_ITEM_COLUMNS_AFTER_REQUEST_ID},
            UNIQUE (tenant, request_id, kind)
        );
        INSERT INTO items_v2 ({ITEM_COLUMNS}) SELECT {ITEM_COLUMNS} FROM items;
        DROP TABLE items;
        ALTER TABLE items_v2 RENAME TO items;
        CREATE INDEX items_queue ON items (status, priority DESC, created_at);
        CREATE INDEX items_tenant_queue ON items (tenant, status, priority DESC, created_at);
        """,
    ),
    Migration(
        3,
        "image bytes in the database, so every node reads them (SQLite keeps its fsynced files)",
        """
        CREATE TABLE IF NOT EXISTS images (
            sha256 TEXT PRIMARY KEY,
            data BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        """,
        # A version on both backends, so one number describes a review store everywhere.
        dialect_sql={"sqlite": "SELECT 1;"},
    ),
    Migration(
        4,
        "privacy: blobs keyed by the bytes stored within the tenant's scope; withheld and kept originals",
        # Old items keep their blobs in the legacy scope '' (stored_sha256 NULL says so).
        """
        ALTER TABLE items ADD COLUMN stored_sha256 TEXT;
        ALTER TABLE items ADD COLUMN image_withheld TEXT;
        ALTER TABLE items ADD COLUMN original_kept INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX items_tenant_image ON items (tenant, image_sha256);
        """,
        dialect_sql={
            "postgres": """
            ALTER TABLE items ADD COLUMN stored_sha256 TEXT;
            ALTER TABLE items ADD COLUMN image_withheld TEXT;
            ALTER TABLE items ADD COLUMN original_kept INTEGER NOT NULL DEFAULT 0;
            CREATE INDEX items_tenant_image ON items (tenant, image_sha256);
            ALTER TABLE images ADD COLUMN scope TEXT NOT NULL DEFAULT '';
            ALTER TABLE images DROP CONSTRAINT images_pkey;
            ALTER TABLE images ADD PRIMARY KEY (scope, sha256);
            """
        },
    ),
    Migration(
        5,
        "audit provenance: which source sampled an item and its inclusion probability (old rows NULL)",
        # audit_source: policy | rollout | none (not an audit sample); inclusion_probability: the
        # chance the item entered the queue (an audit: both sources' union; a review: 1), the
        # Horvitz-Thompson weight's inverse (policies/production_certify.py). NULL: unknown.
        """
        ALTER TABLE items ADD COLUMN audit_source TEXT;
        ALTER TABLE items ADD COLUMN inclusion_probability REAL;
        """,
    ),
    Migration(
        6,
        "double labels: every label an item gets, one row per reviewer (item_labels); items that want two",
        # labels_wanted: 2 for an item drawn for double labelling (review.double_label_fraction);
        # needs_adjudication: its two labels disagreed and an admin's label decides
        # (policies/review/double_labels.py). Labels given before this version are copied in.
        """
        ALTER TABLE items ADD COLUMN labels_wanted INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE items ADD COLUMN needs_adjudication INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE item_labels (
            item_id TEXT NOT NULL,
            reviewer TEXT NOT NULL,
            label_json TEXT NOT NULL,
            labelled_at REAL NOT NULL,
            role TEXT NOT NULL,
            PRIMARY KEY (item_id, reviewer)
        );
        CREATE INDEX item_labels_reviewer ON item_labels (reviewer);
        INSERT INTO item_labels (item_id, reviewer, label_json, labelled_at, role)
            SELECT id, labelled_by, label_json, labelled_at, 'single' FROM items
            WHERE status = 'labelled' AND labelled_by IS NOT NULL AND label_json IS NOT NULL
            AND labelled_at IS NOT NULL;
        """,
    ),
)

# Columns added before the schema was versioned (the first release lacked them): a database
# with no recorded version gets any it lacks before version 1 is recorded.
UNVERSIONED_COLUMNS = {
    "kind": "TEXT NOT NULL DEFAULT 'review'",  # review | audit (a sampled auto-accept) | budget
    "sla_due_at": "REAL",
    "image_deleted_at": "REAL",
}


def adopt_unversioned(db: Connection) -> None:
    """A database from before versioning: add the columns its release did not have yet."""
    if db.dialect.name != "sqlite":
        return  # PostgreSQL stores were versioned from their first day
    have = {row["name"] for row in db.execute("PRAGMA table_info(items)")}
    if not have:
        return  # a new database: version 1 creates everything
    for column, spec in UNVERSIONED_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE items ADD COLUMN {column} {spec}")
