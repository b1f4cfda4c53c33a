"""Erasure: remove one review item's, or one subject's, images, embeddings and derived records.

What a **subject** is. Requests carry no user id, only a tenant (from the API key) and the
client's ``X-Request-Id`` (``[A-Za-z0-9_.:-]{1,128}``). A subject is named ``TENANT/KEY``:

- ``TENANT/sha256:<64 hex>``: one picture of a person: every record the tenant's requests made
  from that exact file (the response's ``image.sha256``; a person asking to be forgotten can
  hand the picture over, and ``sha256sum`` names it);
- ``TENANT/<key>``: the requests whose id is ``<key>`` or starts with ``<key>:``. A client that
  wants its users erasable sends ``X-Request-Id: <user key>:<unique part>`` (e.g.
  ``u-4821:2f9c``); ``<key>`` may itself contain ``:`` (``app:u-4821`` erases ``app:u-4821:*``).

What goes, in every store (``Eraser``):
- review queue: the items (rows with trace, proposed answer and label; stored images, kept
  originals included; payloads of their audit events), by ``ReviewQueue.erase``;
- search store: the entries of the tenant with those review item ids, those image sha256s, or
  (request-id subjects) those request ids; their vectors are also overwritten with zeros in the
  index's operation log, where replicas read them from (retrieval/store.py), so no copy of the
  embedding stays in the database;
- budget ledger: the request ids on reservations are cleared (units stay: they are accounting).

It is an operation over every durable store (the review queue and ledger of policies/, the
search store of retrieval/), so it lives with the service's other operations, above both.
``visionroute privacy erase`` runs it offline, against the stores a serve config names.

Audited: each erased item keeps an ``erased`` event (actor, time, reason), and one ``erasure``
event (under item id ``erasure:<id>``) records the selector, the counts and the sha256 of the
subject key, never the key itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from policies.review_queue import ReviewQueue
from router.services.results import ErasureSummary
from visionroute.errors import InputError

TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
REQUEST_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Subject:
    tenant: str
    request_key: str | None = None
    image_sha256: str | None = None

    @classmethod
    def parse(cls, text: str) -> Subject:
        """``TENANT/sha256:<hex>`` or ``TENANT/<request key>``; InputError naming ``subject``."""
        tenant, _, key = text.partition("/")
        if not TENANT.fullmatch(tenant) or not key:
            raise InputError(
                f"subject must be TENANT/KEY (TENANT from [A-Za-z0-9_.-], KEY a request-id key or "
                f"sha256:<64 hex>), got {text[:80]!r}",
                field="subject",
            )
        if key.startswith("sha256:"):
            digest = key.removeprefix("sha256:").lower()
            if not SHA256.fullmatch(digest):
                raise InputError("a subject's sha256 must be 64 hex digits", field="subject")
            return cls(tenant, image_sha256=digest)
        if not REQUEST_KEY.fullmatch(key):
            raise InputError(
                "a subject's request key must be 1-128 characters from [A-Za-z0-9_.:-]", field="subject"
            )
        return cls(tenant, request_key=key)

    @property
    def key_sha256(self) -> str:
        key = f"sha256:{self.image_sha256}" if self.image_sha256 else self.request_key
        return hashlib.sha256(f"{self.tenant}/{key}".encode()).hexdigest()

    def matches_request(self, request_id: str | None) -> bool:
        key = self.request_key
        return (
            key is not None
            and request_id is not None
            and (request_id == key or request_id.startswith(key + ":"))
        )


@dataclass(frozen=True)
class _SearchErased:
    """The search store's part of an erasure; None when no search store is deployed."""

    entries: int | None
    log_vectors: int | None


class Eraser:
    """Erases across the stores it is given (``search_store``/``ledger`` None: not deployed)."""

    def __init__(
        self, queue: ReviewQueue, *, search_store: Any = None, ledger: Any = None, actor: str
    ) -> None:
        self.queue = queue
        self.search_store = search_store  # retrieval.store.MetadataStore
        self.ledger = ledger  # policies.budgets.BudgetLedger
        self.actor = actor

    def erase_item(self, item_id: str, *, reason: str = "erasure request") -> ErasureSummary:
        item = self.queue.get(item_id)  # NotFound names the item
        return self._erase([item], item.tenant, None, reason, {"selector": "item", "item_id": item_id})

    def erase_subject(self, subject: Subject, *, reason: str = "erasure request") -> ErasureSummary:
        items = self.queue.find_items(
            subject.tenant, request_key=subject.request_key, image_sha256=subject.image_sha256
        )
        selector = {
            "selector": "subject",
            "kind": "image" if subject.image_sha256 else "request_key",
            "subject_sha256": subject.key_sha256,
        }
        return self._erase(items, subject.tenant, subject, reason, selector)

    def _erase(
        self, items, tenant: str, subject: Subject | None, reason: str, selector: dict[str, str]
    ) -> ErasureSummary:
        review = self.queue.erase([item.id for item in items], actor=self.actor, reason=reason)
        image_shas = set(review["image_sha256"])
        if subject is not None and subject.image_sha256:
            image_shas.add(subject.image_sha256)
        request_ids = set(review["request_ids"])
        search = self._erase_search(tenant, review["items"], sorted(image_shas), subject)
        summary = ErasureSummary(
            erasure_id=f"erasure:{uuid.uuid4().hex}",
            **selector,
            tenant=tenant,
            review_items_erased=len(review["items"]),
            images_deleted=review["images_deleted"],
            other_items_lost_image=len(review["other_items_lost_image"]),
            search_entries_erased=search.entries,
            search_log_vectors_zeroed=search.log_vectors,
            ledger_request_ids_cleared=self._clear_ledger(request_ids, subject),
            review_item_ids=list(review["items"]),
        )
        self.queue.record_event(summary.erasure_id, self.actor, "erasure", summary.event_json(reason))
        return summary

    def _erase_search(
        self, tenant: str, item_ids: list[str], image_shas: list[str], subject: Subject | None
    ) -> _SearchErased:
        if self.search_store is None:
            return _SearchErased(entries=None, log_vectors=None)
        from retrieval.schemas import SearchFilters

        store = self.search_store
        ids: set[int] = set()
        if item_ids:
            ids.update(store.item_ids(SearchFilters(tenant=tenant, review_item_ids=item_ids)))
        if image_shas:
            ids.update(store.item_ids(SearchFilters(tenant=tenant, image_sha256=image_shas)))
        if subject is not None and subject.request_key:
            with store.database.read() as conn:  # request ids live in ``extra`` (not filterable)
                rows = conn.execute("SELECT id, extra FROM items WHERE tenant = ?", (tenant,)).fetchall()
            ids.update(int(r[0]) for r in rows if subject.matches_request(json.loads(r[1]).get("request_id")))
        zeroed = 0
        for item_id in sorted(ids):
            found = store.get(item_id)
            if found is None:
                continue
            vector_bytes = found[1].astype("float32").tobytes()
            store.delete_logged(item_id)
            zeroed += self._zero_logged_vector(vector_bytes)
        return _SearchErased(entries=len(ids), log_vectors=zeroed)

    def _zero_logged_vector(self, vector_bytes: bytes) -> int:
        """Overwrite every copy of this embedding in the index's operation log with zeros: a
        replica that has not applied the entry yet adds a zero vector, then its removal."""
        with self.search_store.database.write() as conn:
            return conn.execute(
                "UPDATE oplog SET vector = ? WHERE op = 'add' AND vector = ?",
                (bytes(len(vector_bytes)), vector_bytes),
            ).rowcount

    def _clear_ledger(self, request_ids: set[str], subject: Subject | None) -> int | None:
        if self.ledger is None:
            return None
        cleared = 0
        with self.ledger.database.write() as conn:
            for request_id in sorted(request_ids):
                cleared += conn.execute(
                    "UPDATE reservations SET request_id = NULL WHERE request_id = ?", (request_id,)
                ).rowcount
            if subject is not None and subject.request_key:
                key = subject.request_key
                cleared += conn.execute(
                    "UPDATE reservations SET request_id = NULL WHERE request_id = ?"
                    " OR (request_id >= ? AND request_id < ?)",
                    (key, key + ":", key + ";"),
                ).rowcount
        return cleared
