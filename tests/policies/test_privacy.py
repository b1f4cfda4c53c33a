"""Privacy redaction before storage: the policy, the real detectors (MTCNN, DBNet), what reaches
the review store (never the original under keep_original: false), tenant-scoped blobs, fail
closed, and erasure from every store with an audit trail."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cascades.image_redaction import Redactor
from policies.budgets import BudgetLedger, BudgetRule
from policies.policy_set import parse_policy_set
from policies.privacy import PrivacyPolicy
from policies.review.blobs import BlobRef, blob_scope
from policies.review_queue import ReviewQueue
from router.services.erasure import Eraser, Subject
from visionroute.errors import ConfigError, InputError, NotFound

# The astronaut's face in skimage's photo, annotated by hand (eyes to chin, inside the head).
FACE_XYXY = (195, 85, 255, 160)
FAR_FROM_FACE_XYXY = (0, 300, 120, 512)  # the flag and the suit's arm


@pytest.fixture(scope="module")
def astronaut_png(photos_png) -> bytes:
    return photos_png["astronaut"]


@pytest.fixture(scope="module")
def redactor(tmp_path_factory) -> Redactor:
    from cascades.models import TEXT_DETECTOR_NAME, prepare_models

    models_dir = tmp_path_factory.mktemp("models")
    prepare_models(models_dir, [TEXT_DETECTOR_NAME])  # DBNet only: a copy, no export
    return Redactor(models_dir)


def rgb_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sharpness(rgb: np.ndarray, xyxy: tuple[int, int, int, int]) -> float:
    """Variance of the Laplacian over a region: the edges a face's features make."""
    x1, y1, x2, y2 = xyxy
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[y1:y2, x1:x2]), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def enqueue(queue: ReviewQueue, stored, file_bytes: bytes, *, tenant="acme", request_id="r1"):
    return queue.enqueue(
        request_id=request_id,
        image_bytes=stored.data,
        original_bytes=stored.original,
        image_withheld=stored.withheld,
        image_sha256=hashlib.sha256(file_bytes).hexdigest(),
        tenant=tenant,
        task="classify",
        reason="unsure",
        proposed=[],
        trace={"steps": [stored.step.to_dict()]},
    )


# -- the policy ----------------------------------------------------------------------------------


def test_the_default_blurs_faces_keeps_text_and_never_the_original():
    policy = parse_policy_set({}).privacy
    rule = policy.for_tenant("anyone")
    assert (rule.faces, rule.text, rule.keep_original) == ("blur", "keep", False)
    assert (policy.face_detector, policy.text_detector) == ("mtcnn", "ppocr_det")


def test_a_tenant_overrides_only_what_it_names():
    policy = parse_policy_set(
        {"privacy": {"text": "box", "tenants": {"acme": {"faces": "pixelate"}}}}
    ).privacy
    acme, other = policy.for_tenant("acme"), policy.for_tenant("globex")
    assert (acme.faces, acme.text, acme.keep_original) == ("pixelate", "box", False)
    assert (other.faces, other.text) == ("blur", "box")


@pytest.mark.parametrize(
    "privacy, field, words",
    [
        ({"faces": "smudge"}, "privacy.faces", "'blur', 'pixelate', 'box' or 'keep'"),
        ({"text": "pixelate"}, "privacy.text", "'blur', 'box' or 'keep'"),
        ({"face_detector": "haar"}, "privacy.face_detector", "unknown face detector 'haar'"),
        ({"text_detector": "east"}, "privacy.text_detector", "expected one of ['ppocr_det']"),
        ({"tenants": {"acme": {"faces": "erase"}}}, "privacy.tenants.acme.faces", "'keep'"),
        ({"keep_originals": True}, "privacy.keep_originals", "unknown key"),
    ],
)
def test_an_unknown_mode_or_detector_is_a_config_error_naming_the_field(privacy, field, words):
    with pytest.raises(ConfigError) as error:
        parse_policy_set({"privacy": privacy})
    assert error.value.field == field and words in error.value.reason


# -- redaction with the real detectors -----------------------------------------------------------


def test_the_astronauts_face_is_blurred_and_the_rest_of_the_photo_is_untouched(redactor, astronaut_png):
    stored = redactor.prepare(astronaut_png, None, PrivacyPolicy(), "acme", policy_version="p-1")
    original, redacted = rgb_of(astronaut_png), rgb_of(stored.data)
    assert sharpness(redacted, FACE_XYXY) < 0.05 * sharpness(original, FACE_XYXY)
    x1, y1, x2, y2 = FAR_FROM_FACE_XYXY
    assert np.array_equal(redacted[y1:y2, x1:x2], original[y1:y2, x1:x2])  # PNG: lossless elsewhere
    step = stored.step
    assert step.stage == "privacy:redact" and step.error is None and step.policy_version == "p-1"
    faces = step.details["faces"]
    assert faces["count"] == 1 and faces["detector"] == "mtcnn"
    assert faces["detector_version"].startswith("facenet-pytorch==2.6.0;sha256:")
    (box,) = faces["boxes_xyxy"]  # the whole annotated face lies inside the redacted box
    assert (
        box[0] <= FACE_XYXY[0]
        and box[1] <= FACE_XYXY[1]
        and box[2] >= FACE_XYXY[2]
        and box[3] >= FACE_XYXY[3]
    )
    assert set(step.details) == {"rule", "faces", "stored", "metadata_removed", "original_kept"}  # no pixels


@pytest.mark.parametrize("mode", ["box", "pixelate"])
def test_box_fills_the_face_and_pixelate_leaves_blocks(redactor, astronaut_png, mode):
    stored = redactor.prepare(astronaut_png, None, PrivacyPolicy(faces=mode), "acme")
    x1, y1, x2, y2 = stored.step.details["faces"]["boxes_xyxy"][0]
    region = rgb_of(stored.data)[y1:y2, x1:x2].astype(int)
    if mode == "box":
        assert region.max() == 0
    else:  # neighbouring pixels repeat inside a block: few distinct rows remain
        assert len(np.unique(region[:, :, 0], axis=0)) <= 12
        assert sharpness(rgb_of(stored.data), FACE_XYXY) < 0.5 * sharpness(rgb_of(astronaut_png), FACE_XYXY)


def test_dbnet_boxes_the_printed_text_of_a_page(redactor, photos_png):
    stored = redactor.prepare(photos_png["page"], None, PrivacyPolicy(faces="keep", text="box"), "acme")
    text = stored.step.details["text"]
    assert text["count"] >= 5 and text["detector_version"].startswith("rapidocr-onnxruntime==")
    redacted = rgb_of(stored.data)
    for x1, y1, x2, y2 in text["boxes_xyxy"]:
        assert redacted[y1:y2, x1:x2].max() == 0


def test_a_photo_with_nothing_to_redact_is_stored_as_sent_but_metadata_goes(redactor):
    flat = np.full((64, 64, 3), 90, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(flat).save(buffer, format="PNG")
    plain = buffer.getvalue()
    assert redactor.prepare(plain, None, PrivacyPolicy(), "acme").data == plain
    exif = Image.Exif()
    exif[0x013B] = "Jane Doe"  # Artist
    buffer = io.BytesIO()
    Image.fromarray(flat).save(buffer, format="JPEG", exif=exif.tobytes())
    stored = redactor.prepare(buffer.getvalue(), None, PrivacyPolicy(), "acme")
    assert stored.step.details["metadata_removed"] == ["exif"]
    assert b"Jane Doe" not in stored.data and "exif" not in Image.open(io.BytesIO(stored.data)).info


# -- what reaches the store ---------------------------------------------------------------------


def slices(data: bytes, n: int = 3, size: int = 64) -> list[bytes]:
    """Short pieces from inside a file: found wherever any part of it is stored uncompressed
    (PostgreSQL cuts a large value into ~2 KB TOAST chunks; a whole file would never match)."""
    return [data[len(data) * (i + 1) // (n + 1) :][:size] for i in range(n)]


def storage_files(tmp_path: Path, request, state) -> list[Path]:
    """Every file the store may have written: the review folder, and on PostgreSQL the whole
    server's data directory (heap, TOAST and WAL), after a checkpoint."""
    files = stored_files(tmp_path)
    if state is not None:
        import psycopg

        with psycopg.connect(request.getfixturevalue("postgres_dsn"), autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        files += stored_files(request.getfixturevalue("postgres_server").dir / "db")
    return files


def test_with_keep_original_false_the_original_bytes_are_nowhere_in_the_store(
    tmp_path, request, state, redactor, astronaut_png
):
    queue = ReviewQueue(tmp_path / "review", state=state)
    stored = redactor.prepare(astronaut_png, None, PrivacyPolicy(), "acme")
    item = enqueue(queue, stored, astronaut_png)
    assert queue.image(item.id) == stored.data != astronaut_png  # the reviewer sees the redaction
    assert item.stored_sha256 == hashlib.sha256(stored.data).hexdigest() != item.image_sha256
    found = {piece: False for piece in slices(astronaut_png) + slices(stored.data)}
    for path in storage_files(tmp_path, request, state):
        try:
            content = path.read_bytes()
        except OSError:  # a PostgreSQL file that went away meanwhile
            continue
        for piece in found:
            found[piece] = found[piece] or piece in content
    assert not any(found[piece] for piece in slices(astronaut_png))  # the original: nowhere
    assert all(found[piece] for piece in slices(stored.data))  # the search does find what is stored
    with pytest.raises(NotFound):
        queue.original_image(item.id)
    queue.close()


def test_keep_original_stores_the_file_beside_the_redaction_the_reviewer_sees(
    tmp_path, redactor, astronaut_png
):
    queue = ReviewQueue(tmp_path / "review")
    stored = redactor.prepare(astronaut_png, None, PrivacyPolicy(keep_original=True), "acme")
    item = enqueue(queue, stored, astronaut_png)
    assert item.original_kept and queue.image(item.id) != astronaut_png
    assert queue.original_image(item.id) == astronaut_png
    assert queue.purge_images(1.0, now=item.created_at + 10) == {"items": 1, "images_deleted": 2}
    assert not stored_files(tmp_path / "review" / "images")


def test_blobs_are_scoped_by_tenant_so_a_redacted_item_never_points_at_another_tenants_original(
    tmp_path, state, redactor, astronaut_png
):
    queue = ReviewQueue(tmp_path / "review", state=state)
    keeps = redactor.prepare(astronaut_png, None, PrivacyPolicy(faces="keep"), "acme")
    assert keeps.data == astronaut_png  # acme's policy stores the photo as sent
    acme = enqueue(queue, keeps, astronaut_png, tenant="acme")
    redacts = redactor.prepare(astronaut_png, None, PrivacyPolicy(), "globex")
    globex = enqueue(queue, redacts, astronaut_png, tenant="globex")
    assert acme.image_sha256 == globex.image_sha256  # one file ...
    assert acme.shown_ref == BlobRef(blob_scope("acme"), acme.image_sha256)
    assert globex.shown_ref.scope == blob_scope("globex")  # ... two scopes, two blobs
    assert queue.image(globex.id) == redacts.data and queue.image(acme.id) == astronaut_png
    # The same bytes in two tenants are two blobs: erasing acme's leaves globex's own copy alone.
    both = enqueue(queue, keeps, astronaut_png, tenant="globex", request_id="r2")
    assert both.shown_ref != acme.shown_ref
    queue.erase([acme.id], actor="dpo", reason="test")
    assert queue.image(both.id) == astronaut_png and queue.image(globex.id) == redacts.data
    queue.close()


def test_a_failing_detector_stores_nothing_and_the_item_keeps_the_reason(tmp_path, astronaut_png):
    broken = Redactor(tmp_path / "no-models")  # the DBNet model is not prepared here
    stored = broken.prepare(astronaut_png, None, PrivacyPolicy(faces="keep", text="blur"), "acme")
    assert stored.data is None and stored.original is None
    assert "ppocr_det" in stored.withheld and "not prepared" in stored.withheld
    assert stored.step.error and "fail closed" in stored.step.reason
    queue = ReviewQueue(tmp_path / "review")
    item = enqueue(queue, stored, astronaut_png)
    assert item.image_withheld == stored.withheld and not item.public_dict()["image_available"]
    with pytest.raises(NotFound, match="not stored"):
        queue.image(item.id)
    assert not stored_files(tmp_path / "review" / "images")
    with pytest.raises(InputError):  # no image and no reason: refused
        queue.enqueue(
            request_id="r2",
            image_bytes=None,
            image_sha256=item.image_sha256,
            tenant="acme",
            task="classify",
            reason="unsure",
            proposed=[],
            trace={},
        )


def test_a_detector_raising_on_an_image_fails_closed(monkeypatch, redactor, astronaut_png):
    from cascades.detectors_privacy import MtcnnFaceDetector

    def explode(self, rgb):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(MtcnnFaceDetector, "detect", explode)
    stored = redactor.prepare(astronaut_png, None, PrivacyPolicy(keep_original=True), "acme")
    assert stored.data is None and stored.original is None  # keep_original keeps nothing either
    assert stored.withheld == "privacy redaction failed at mtcnn: RuntimeError: CUDA error: out of memory"


# -- erasure ------------------------------------------------------------------------------------


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_subjects_parse_into_a_tenant_and_a_request_key_or_an_image():
    assert Subject.parse("acme/u-42") == Subject("acme", request_key="u-42")
    digest = "ab" * 32
    assert Subject.parse(f"acme/sha256:{digest.upper()}") == Subject("acme", image_sha256=digest)
    assert Subject("acme", request_key="u-42").matches_request("u-42:7")
    assert not Subject("acme", request_key="u-42").matches_request("u-420")
    for bad in ("u-42", "acme/", "ac me/u", "acme/sha256:xyz", "acme/a b"):
        with pytest.raises(InputError) as error:
            Subject.parse(bad)
        assert error.value.field == "subject"


def test_erasing_a_subject_removes_it_from_every_store_with_an_audit_trail(tmp_path, state):
    from retrieval.schemas import ItemMetadata
    from retrieval.store import MetadataStore

    queue = ReviewQueue(tmp_path / "review", state=state)
    store = MetadataStore(tmp_path / "index" / "items.sqlite", state=state, name="search")
    ledger = BudgetLedger(tmp_path / "review" / "budgets.sqlite3", state=state)
    rule = BudgetRule(name="all", window_s=3600, cap_units=100)
    images = {"u-42:1": png_bytes(10), "u-42:2": png_bytes(20), "u-420:1": png_bytes(30)}
    items, vectors = {}, {}
    for n, (request_id, data) in enumerate(images.items()):
        for tenant in ("acme", "globex"):
            sha = hashlib.sha256(data).hexdigest()
            item = queue.enqueue(
                request_id=request_id,
                image_bytes=data,
                image_sha256=sha,
                tenant=tenant,
                task="classify",
                reason="unsure",
                proposed=[{"label": "cat"}],
                trace={"steps": []},
            )
            items[tenant, request_id] = item
            vector = np.zeros(8, np.float32)
            vector[n] = 1.0
            vectors[tenant, request_id] = vector
            store.upsert(
                None,
                vector,
                ItemMetadata(
                    tenant=tenant, image_sha256=sha, review_item_id=item.id, extra={"request_id": request_id}
                ),
            )
            ledger.reserve(
                [rule], tenant=tenant, feature="classify", tier="onnx", units=1, request_id=request_id
            )
    # An accepted request of the subject: indexed for search, never queued for review.
    store.upsert(
        None, np.eye(8, dtype=np.float32)[7], ItemMetadata(tenant="acme", extra={"request_id": "u-42:3"})
    )

    eraser = Eraser(queue, search_store=store, ledger=ledger, actor="dpo@acme")
    result = eraser.erase_subject(Subject.parse("acme/u-42"), reason="GDPR art. 17")
    erased = {items["acme", "u-42:1"].id, items["acme", "u-42:2"].id}
    assert set(result.review_item_ids) == erased
    assert result.review_items_erased == 2 and result.images_deleted == 2
    assert result.search_entries_erased == 3 and result.search_log_vectors_zeroed >= 3
    # Review queue: rows and images gone; others (acme's u-420, globex's u-42) untouched.
    remaining = {(i.tenant, i.request_id) for i in queue.iter_all()}
    assert remaining == {
        ("acme", "u-420:1"),
        ("globex", "u-42:1"),
        ("globex", "u-42:2"),
        ("globex", "u-420:1"),
    }
    for item_id in erased:
        with pytest.raises(NotFound):
            queue.get(item_id)
        events = queue.audit_log(item_id)
        assert events[-1]["action"] == "erased" and events[-1]["actor"] == "dpo@acme"
        assert all(e["new_json"] is None for e in events[:-1])  # earlier payloads scrubbed
    with pytest.raises(NotFound):
        queue.blobs.get(items["acme", "u-42:1"].shown_ref)
    assert queue.image(items["globex", "u-42:1"].id) == images["u-42:1"]
    summary = queue.audit_log(result.erasure_id)
    assert summary[0]["action"] == "erasure" and "u-42" not in json.dumps(summary)  # the key's hash only
    counts = {k: v for k, v in result.to_json().items() if k not in ("erasure_id", "review_item_ids")}
    assert summary[0]["new_json"] == json.dumps({**counts, "reason": "GDPR art. 17"})  # the event as before
    # Search: the subject's entries and every logged copy of their vectors are gone.
    left = {
        (m.tenant, m.extra.get("request_id"))
        for m in (store.get(i)[0].metadata for i in store.item_ids(_all()))
    }
    assert ("acme", "u-42:1") not in left and ("acme", "u-42:3") not in left and ("globex", "u-42:1") in left
    with store.database.read() as conn:
        logged = [bytes(r[0]) for r in conn.execute("SELECT vector FROM oplog WHERE op = 'add'").fetchall()]
    assert (
        vectors["acme", "u-42:1"].tobytes() not in logged
        and np.eye(8, dtype=np.float32)[7].tobytes() not in logged
    )
    assert vectors["acme", "u-420:1"].tobytes() in logged
    # Ledger: the subject's request ids are cleared (units stay). Reservations record no tenant,
    # so globex's reservations under the same ids lose their (reference-only) request id too.
    with ledger.database.read() as conn:
        rows = conn.execute("SELECT request_id, units FROM reservations").fetchall()
    assert sorted(r[0] or "-" for r in rows) == ["-", "-", "-", "-", "u-420:1", "u-420:1"]
    assert [r[1] for r in rows] == [1.0] * 6
    for closable in (queue, store, ledger):
        closable.close()


def _all():
    from retrieval.schemas import SearchFilters

    return SearchFilters()


def test_erasing_an_image_takes_it_from_the_tenants_other_items_too(tmp_path):
    queue = ReviewQueue(tmp_path / "review")
    data = png_bytes(50)
    fields = dict(image_bytes=data, image_sha256=hashlib.sha256(data).hexdigest(), task="classify")
    fields |= dict(reason="unsure", proposed=[], trace={})
    first = queue.enqueue(request_id="a", tenant="acme", **fields)
    second = queue.enqueue(request_id="b", tenant="acme", **fields)
    result = Eraser(queue, actor="dpo").erase_item(first.id)
    assert result.review_items_erased == 1 and result.other_items_lost_image == 1
    after = queue.get(second.id)
    assert after.status == "expired" and queue.audit_log(second.id)[-1]["action"] == "image_erased"
    assert not stored_files(tmp_path / "review" / "images")
    with pytest.raises(NotFound):
        Eraser(queue, actor="dpo").erase_item("no-such-item")


def test_the_cli_erases_an_item_and_refuses_a_bad_subject(tmp_path, capsys):
    from visionroute.cli import main

    queue = ReviewQueue(tmp_path / "review")
    data = png_bytes(70)
    item = queue.enqueue(
        request_id="u-1:1",
        image_bytes=data,
        image_sha256=hashlib.sha256(data).hexdigest(),
        tenant="acme",
        task="classify",
        reason="unsure",
        proposed=[],
        trace={},
    )
    queue.close()
    where = ["--path", str(tmp_path / "review"), "--index-dir", str(tmp_path / "no-index")]
    assert main(["privacy", "erase", "--item", item.id, "--actor", "ops", *where]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["review_items_erased"] == 1 and printed["search_entries_erased"] is None
    assert main(["privacy", "erase", "--subject", "acme", *where]) == 2
    assert "subject" in capsys.readouterr().err
    assert main(["privacy", "audit", item.id, "--path", str(tmp_path / "review")]) == 0
    assert [e["action"] for e in json.loads(capsys.readouterr().out)] == ["enqueue", "erased"]
    assert main(["privacy", "audit", printed["erasure_id"], "--path", str(tmp_path / "review")]) == 0
    (event,) = json.loads(capsys.readouterr().out)
    assert event["action"] == "erasure" and event["actor"] == "ops"


# -- the migration ------------------------------------------------------------------------------


def test_a_version_3_store_migrates_and_its_unscoped_images_stay_readable(tmp_path, state):
    """Version 4 adds the tenant scope: an item stored before it keeps its blob where it was
    (SQLite: images/<sha[:2]>/<sha>; PostgreSQL: an images row, now in scope '')."""
    from policies.review_queue import MIGRATIONS, STORE
    from visionroute.migrations import migrate
    from visionroute.state import open_database

    root = tmp_path / "review"
    root.mkdir()
    old_image = png_bytes(90)
    sha = hashlib.sha256(old_image).hexdigest()
    database = open_database(state, "review", root / "review.sqlite3")
    assert migrate(database, STORE, MIGRATIONS[:3]).to_version == 3
    with database.write() as db:
        db.execute(
            "INSERT INTO items (id, request_id, tenant, task, image_sha256, created_at, reason, proposed_json,"
            " trace_json) VALUES ('old', 'r0', 'acme', 'classify', ?, 100.0, 'unsure', '[]', '{}')",
            (sha,),
        )
        if state is not None:
            db.execute("INSERT INTO images (sha256, data, created_at) VALUES (?, ?, 100.0)", (sha, old_image))
    database.close()
    if state is None:
        (root / "images" / sha[:2]).mkdir(parents=True)
        (root / "images" / sha[:2] / sha).write_bytes(old_image)
    queue = ReviewQueue(root, state=state)
    assert queue.schema.applied == list(range(4, len(MIGRATIONS) + 1))  # 4 scopes the images
    old = queue.get("old")
    assert old.stored_sha256 is None and old.shown_ref == BlobRef("", sha)
    assert queue.image("old") == old_image
    fields = dict(image_sha256=sha, task="classify", reason="unsure", proposed=[], trace={})
    new = queue.enqueue(request_id="r1", image_bytes=old_image, tenant="acme", **fields)
    assert new.shown_ref == BlobRef(blob_scope("acme"), sha) and queue.image(new.id) == old_image
    # Retention takes the old item's unscoped blob and leaves the new item's scoped one.
    assert queue.purge_images(60.0, now=old.created_at + 120) == {"items": 1, "images_deleted": 1}
    assert queue.image(new.id) == old_image
    with pytest.raises(NotFound):
        queue.blobs.get(old.shown_ref)
    queue.close()
