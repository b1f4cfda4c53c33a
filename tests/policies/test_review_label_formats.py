"""Review labels in the formats tools read: Label Studio out (tasks with the cascade's answer as a
prediction, the labelling interface) and back in (its JSON export, hand-written here in the
documented shape), COCO (read back with pycocotools) and CSV."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from policies.review.export import FORMATS, LOCAL_FILES_URL, Export
from policies.review.label_import import LabelImport, summary
from policies.review.label_studio import item_version, parse_export
from policies.review_queue import ReviewQueue
from visionroute.cli import main
from visionroute.cli import review as review_cli

FIXTURES = Path(__file__).parent / "fixtures"
CLASSES = ["cat", "dog", "bird"]
TEXT_BOXES = [  # a text detector's answer on a 200 x 100 page
    {"label": "text", "class_id": 0, "confidence": 0.55, "xyxy": [20.0, 10.0, 80.0, 30.0]},
    {"label": "text", "class_id": 0, "confidence": 0.45, "xyxy": [100.0, 50.0, 180.0, 90.0]},
]


def png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def enqueue(queue: ReviewQueue, seed: int, task: str) -> Any:
    size = (32, 32) if task == "classify" else (200, 100)
    data = png(seed, size)
    if task == "classify":
        proposed = [
            {"label": "cat", "class_id": 0, "confidence": 0.41, "xyxy": [0.0, 0.0, 32.0, 32.0]},
            {"label": "dog", "class_id": 1, "confidence": 0.30, "xyxy": [0.0, 0.0, 32.0, 32.0]},
        ]
        labels, model = CLASSES, "efficientnet_lite0"
    else:
        proposed, labels, model = TEXT_BOXES, ["text"], "ppocr_det"
    trace = {
        "steps": [
            {"stage": "input", "details": {"format": "PNG", "width": size[0], "height": size[1]}},
            {
                "stage": f"onnx:{task}",
                "model": model,
                "model_version": f"{model}==1;sha256:abc",
                "score": 0.4,
            },
        ]
    }
    return queue.enqueue(
        request_id=f"{task}-{seed}",
        image_bytes=data,
        image_sha256=hashlib.sha256(data).hexdigest(),
        tenant="acme",
        task=task,
        reason="unsure",
        proposed=proposed,
        trace=trace,
        label_set=labels,
    )


def fill(fixture: str, items: dict[str, Any], versions: dict[str, str] | None = None) -> Any:
    """The hand-written export with ``@itemX`` / ``@versionX`` replaced by real ids and versions."""
    text = (FIXTURES / fixture).read_text()
    for key, item in items.items():
        version = (versions or {}).get(key) or item_version(item)
        text = text.replace(f'"@item{key}"', json.dumps(item.id)).replace(
            f'"@version{key}"', json.dumps(version)
        )
    return json.loads(text)


def key_paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in key_paths(v, f"{prefix}.{k}" if prefix else k)} | {
            prefix
        }
    return {prefix}


@pytest.fixture
def queue(tmp_path, state):
    """A queue on SQLite and on PostgreSQL (the ``state`` fixture): export and import read and
    write through the store's own connections."""
    queue = ReviewQueue(tmp_path / "review", state=state)
    yield queue
    queue.close()


@pytest.fixture
def sqlite_queue(tmp_path):
    queue = ReviewQueue(tmp_path / "review")
    yield queue
    queue.close()


def test_label_studio_tasks_have_the_documented_shape_and_match_their_labelling_interface(queue, tmp_path):
    cat = enqueue(queue, 1, "classify")
    page = enqueue(queue, 2, "text")
    summary_ = Export(queue.database, queue.blobs).export(tmp_path / "ls", "label-studio")
    assert summary_["written"] == 2 and sorted(summary_["files"]) == [
        "label-studio-classify.json",
        "label-studio-classify.xml",
        "label-studio-text.json",
        "label-studio-text.xml",
    ]
    documented = json.loads((FIXTURES / "label_studio_import_documented.json").read_text())
    documented_by_type = {r["type"]: key_paths(r) for r in documented["predictions"][0]["result"]}
    for task_name, item in (("classify", cat), ("text", page)):
        (task,) = json.loads((tmp_path / "ls" / f"label-studio-{task_name}.json").read_text())
        assert task["data"]["image"] == LOCAL_FILES_URL + f"{item.id}.png"
        assert (tmp_path / "ls" / "images" / f"{item.id}.png").read_bytes() == queue.image(item.id)
        assert task["data"]["visionroute_item_id"] == item.id
        assert task["data"]["visionroute_item_version"] == item_version(item)
        (prediction,) = task["predictions"]
        assert prediction["model_version"].startswith(item.trace["steps"][1]["model"])
        for result in prediction["result"]:  # every key the guide's result of that type has
            assert documented_by_type[result["type"]] <= key_paths(result)
        # Every result names a control and the object it labels in the labelling interface.
        config = ET.fromstring((tmp_path / "ls" / f"label-studio-{task_name}.xml").read_text())
        image = config.find("Image")
        assert image.get("name") == "image" and image.get("value") == "$image"
        controls = {el.get("name"): el for el in config if el.get("toName")}
        for result in prediction["result"]:
            control = controls[result["from_name"]]
            assert result["to_name"] == control.get("toName") == image.get("name")
            options = [child.get("value") for child in control]
            chosen = result["value"].get("choices") or result["value"]["rectanglelabels"]
            assert set(chosen) <= set(options)
    (cat_task,) = json.loads((tmp_path / "ls" / "label-studio-classify.json").read_text())
    (cat_result,) = cat_task["predictions"][0]["result"]  # the classifier's top class
    assert cat_result["type"] == "choices" and cat_result["value"]["choices"] == ["cat"]
    assert [
        c.get("value")
        for c in ET.fromstring((tmp_path / "ls" / "label-studio-classify.xml").read_text()).find(
            "Choices[@name='label']"
        )
    ] == CLASSES
    (page_task,) = json.loads((tmp_path / "ls" / "label-studio-text.json").read_text())
    first, second = page_task["predictions"][0]["result"]
    assert first["type"] == "rectanglelabels" and (first["original_width"], first["original_height"]) == (
        200,
        100,
    )
    assert first["value"] == {  # percent of the image: 20..80 of 200 px, 10..30 of 100 px
        "x": 10.0,
        "y": 10.0,
        "width": 30.0,
        "height": 20.0,
        "rotation": 0,
        "rectanglelabels": ["text"],
    }
    assert second["value"]["x"] == 50.0 and second["score"] == 0.45


def test_a_label_studio_export_imports_as_labels_with_reviewer_and_version_checked(queue, tmp_path):
    items = {str(n): enqueue(queue, n, "classify") for n in range(1, 8)}
    exported = fill("label_studio_export_classify.json", items)
    lease = queue.claim("eve", item_id=items["5"].id)  # labelled in the queue after the export
    queue.submit_label(
        items["5"].id, reviewer="eve", lease_token=lease.lease_token, label={"verdict": "reject"}
    )

    outcomes = LabelImport(queue.database).apply(parse_export(exported))
    by_task = {o.task_id: o for o in outcomes}
    assert [by_task[t].status for t in range(101, 109)] == [
        "imported",
        "imported",
        "refused",
        "refused",
        "refused",
        "refused",
        "skipped",
        "imported",
    ]
    assert by_task[103].field == "label" and "zebra" in by_task[103].reason  # outside the label set
    assert by_task[104].field == "completed_by"  # no reviewer
    assert by_task[105].field == "data.visionroute_item_version" and "eve" in by_task[105].reason
    assert by_task[106].field == "data.visionroute_item_id"  # unknown item
    assert "skipped in Label Studio" in by_task[107].reason

    confirmed, corrected, rejected = (queue.get(items[k].id) for k in ("1", "2", "7"))
    assert confirmed.status == "labelled" and confirmed.labelled_by == "ann@example.com"
    assert confirmed.label == {"verdict": "confirm", "label": "cat", "boxes": items["1"].proposed}
    assert corrected.labelled_by == "label-studio:2"  # the later, not cancelled annotation
    assert corrected.label == {"verdict": "correct", "label": "dog", "boxes": None}
    assert rejected.label["verdict"] == "reject"
    for key in ("3", "4", "6"):
        assert queue.get(items[key].id).status == "pending"
    assert queue.get(items["5"].id).label == {"verdict": "reject"}  # the queue's label stands
    event = queue.audit_log(confirmed.id)[-1]
    assert event["action"] == "label_import" and event["actor"] == "ann@example.com"

    # Importing the same file again changes nothing.
    audit_before = [len(queue.audit_log(item.id)) for item in items.values()]
    again = {o.task_id: o.status for o in LabelImport(queue.database).apply(parse_export(exported))}
    assert [again[t] for t in (101, 102, 108)] == ["unchanged"] * 3
    assert [len(queue.audit_log(item.id)) for item in items.values()] == audit_before
    counts = summary(LabelImport(queue.database).apply(parse_export(exported)))
    assert (counts["imported"], counts["unchanged"], counts["refused"], counts["skipped"]) == (0, 3, 4, 1)


def test_an_item_claimed_in_the_queue_is_refused_until_released(queue):
    item = enqueue(queue, 1, "classify")
    exported = fill("label_studio_export_classify.json", {"1": item})[:1]
    lease = queue.claim("eve", item_id=item.id)
    (outcome,) = LabelImport(queue.database).apply(parse_export(exported))
    assert outcome.status == "refused" and "claimed by eve" in outcome.reason
    queue.release(item.id, reviewer="eve", lease_token=lease.lease_token)
    (outcome,) = LabelImport(queue.database).apply(parse_export(exported))  # a lease is no new version
    assert outcome.status == "imported"


def test_box_annotations_in_percent_become_pixel_boxes_and_export_to_coco(queue, tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    items = {key: enqueue(queue, n, "text") for n, key in enumerate("ABCD", start=10)}
    outcomes = LabelImport(queue.database).apply(parse_export(fill("label_studio_export_boxes.json", items)))
    assert [(o.status, o.field) for o in outcomes] == [
        ("imported", None),
        ("imported", None),
        ("refused", "result.value.rotation"),
        ("refused", "label"),
    ]
    same, moved = queue.get(items["A"].id), queue.get(items["B"].id)
    assert same.label["verdict"] == "confirm" and same.label["boxes"] == TEXT_BOXES  # unchanged prediction
    assert moved.label["verdict"] == "correct"
    assert moved.label["boxes"] == [
        {"label": "text", "class_id": 0, "confidence": 1.0, "xyxy": [25.0, 20.0, 75.0, 50.0]}
    ]

    result = Export(queue.database, queue.blobs).export(tmp_path / "coco", "coco")
    assert result["files"] == ["coco-text.json"] and result["written"] == 2
    coco = coco_api.COCO(str(tmp_path / "coco" / "coco-text.json"))  # the reference reader
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["text"]
    by_item = {img["visionroute_item_id"]: img for img in coco.loadImgs(coco.getImgIds())}
    moved_image = by_item[moved.id]
    assert (moved_image["width"], moved_image["height"]) == (200, 100)
    assert (tmp_path / "coco" / moved_image["file_name"]).read_bytes() == queue.image(moved.id)
    (annotation,) = coco.loadAnns(coco.getAnnIds(imgIds=[moved_image["id"]]))
    assert annotation["bbox"] == [25.0, 20.0, 50.0, 30.0] and annotation["area"] == 1500.0
    assert len(coco.getAnnIds(imgIds=[by_item[same.id]["id"]])) == 2


def test_csv_and_jsonl_formats_and_coco_leaves_class_tasks_out(queue, tmp_path):
    items = {str(n): enqueue(queue, n, "classify") for n in range(1, 3)}
    LabelImport(queue.database).apply(parse_export(fill("label_studio_export_classify.json", items)))
    export = Export(queue.database, queue.blobs)
    csv_summary = export.export(tmp_path / "csv", "csv")
    rows = list(csv.DictReader((tmp_path / "csv" / "labels.csv").open()))
    assert sorted((r["label"], r["verdict"]) for r in rows) == [("cat", "confirm"), ("dog", "correct")]
    assert all((tmp_path / "csv" / "images" / r["image"]).is_file() for r in rows)
    assert not (tmp_path / "csv" / "traces.jsonl").exists() and csv_summary["written"] == 2
    export.export(tmp_path / "jsonl", "jsonl")
    lines = [json.loads(line) for line in (tmp_path / "jsonl" / "labels.jsonl").read_text().splitlines()]
    assert sorted(line["labelled_by"] for line in lines) == ["ann@example.com", "label-studio:2"]
    assert not (tmp_path / "jsonl" / "labels.csv").exists()
    coco = export.export(tmp_path / "coco", "coco")
    assert coco["files"] == [] and coco["class_task"] == 2


def test_bad_exports_are_refused_naming_the_field():
    from visionroute.errors import InputError

    with pytest.raises(InputError, match="list of tasks") as caught:
        parse_export("not tasks")
    assert caught.value.field == "file"
    (outcome,) = parse_export([{"data": {"image": "x.png"}, "annotations": []}])
    assert outcome.status == "refused" and outcome.field == "data.visionroute_item_id"
    (outcome,) = parse_export([42])
    assert outcome.status == "refused" and outcome.field == "[0]"


def test_cli_export_and_import_with_a_reviewer_map(sqlite_queue, tmp_path, capsys):
    queue = sqlite_queue
    assert review_cli.EXPORT_FORMATS == list(FORMATS) and review_cli.LOCAL_FILES_URL == LOCAL_FILES_URL
    items = {str(n): enqueue(queue, n, "classify") for n in range(1, 3)}
    path = str(queue.root)
    assert (
        main(["review", "export", "--path", path, "--format", "label-studio", "--out", str(tmp_path / "o")])
        == 0
    )
    tasks = json.loads((tmp_path / "o" / "label-studio-classify.json").read_text())
    assert sorted(t["data"]["visionroute_item_id"] for t in tasks) == sorted(i.id for i in items.values())
    capsys.readouterr()
    export_file = tmp_path / "ls-export.json"
    export_file.write_text(json.dumps(fill("label_studio_export_classify.json", items)[:2]))
    reviewers = tmp_path / "reviewers.json"
    reviewers.write_text(json.dumps({"ann@example.com": "ann"}))
    code = main(
        ["review", "import-label-studio", str(export_file), "--path", path, "--reviewers", str(reviewers)]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and (report["imported"], report["refused"]) == (1, 1)  # user 2 is not in the map
    (refused,) = report["not_imported"]
    assert refused["task_id"] == 102 and refused["field"] == "completed_by"
    assert queue.get(items["1"].id).labelled_by == "ann"
    assert main(["review", "import-label-studio", str(tmp_path / "missing.json"), "--path", path]) == 2


def test_the_labelling_interface_escapes_label_names():
    from policies.review.label_studio import BOXES, CHOICES, label_config

    names = ['a "quoted" name', "fish & chips", "<tag>"]
    for kind, tag in ((CHOICES, "Choices"), (BOXES, "RectangleLabels")):
        control = ET.fromstring(label_config(kind, names)).find(f"{tag}[@name='label']")
        assert [option.get("value") for option in control] == names
