"""``visionroute batch run`` (router/batch/): real photos through the service's own pipeline.

Without Ray: manifests and their bad rows, request ids, the gathered cheap tier, and the actor
class itself over a numpy batch. With a local Ray (``slow``): a folder through the CLI and a JSONL
manifest through ``run_batch``, both output formats, a rerun that skips what is done, and no
second review item for an image id even when the output folder is gone.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from router.batch.gather import GatheredOnnxTier
from router.batch.inputs import read_items
from router.batch.output import JSONL_NAME, jsonl_records, read_results
from router.batch.worker import BatchAnalyzer, batch_request_id
from router.config import parse_app_config
from router.services.common import REQUEST_ID_PATTERN
from tests.conftest import photo_png
from tests.router.colour_model import LABELS, write_colour_model
from visionroute.errors import ConfigError

PHOTOS = ("coffee", "chelsea", "astronaut")


def colour_args(root: Path) -> dict:
    """The args of a one-task service around the colour classifier (tests/router/colour_model.py)."""
    model = write_colour_model(root / "colour.onnx")
    return {
        "models_dir": str(root),
        "default_task": "colour",
        "cascades": {
            "colour": {
                "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                "max_batch_size": 4,
            }
        },
        "review": {"path": str(root / "review")},
        "retrieval": {"enabled": False},
    }


def serve_config_file(root: Path) -> Path:
    path = root / "serve_config.yaml"
    document = {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [{"name": "vr", "import_path": "router.app:build_app", "args": colour_args(root)}],
    }
    path.write_text(yaml.safe_dump(document))
    return path


def photo_folder(root: Path) -> Path:
    folder = root / "images"
    (folder / "more").mkdir(parents=True)
    for name in PHOTOS[:2]:
        (folder / f"{name}.png").write_bytes(photo_png(name))
    (folder / "more" / "astronaut.png").write_bytes(photo_png("astronaut"))
    (folder / "more" / "broken.png").write_bytes(b"these bytes are not an image")
    (folder / "notes.txt").write_text("not an image file: not listed")
    return folder


def review_items(root: Path) -> list:
    from policies.review_queue import ReviewQueue

    queue = ReviewQueue(root / "review")
    try:
        return list(queue.iter_all())
    finally:
        queue.close()


# -- inputs, without Ray ---------------------------------------------------------------------------


def test_a_folder_lists_its_image_files_with_their_relative_paths_as_ids(tmp_path):
    items = read_items(photo_folder(tmp_path))
    assert [i.id for i in items] == ["chelsea.png", "coffee.png", "more/astronaut.png", "more/broken.png"]
    assert all(i.kind == "path" and Path(i.source).is_file() and not i.is_bad for i in items)


def test_a_csv_manifest_turns_each_bad_row_into_that_rows_error(tmp_path):
    (tmp_path / "a.png").write_bytes(photo_png("coffee"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,path,url,tenant\n"
        "one,a.png,,acme\n"  # relative to the manifest's folder
        "two,,,\n"  # no source
        "three,a.png,https://example.com/a.png,\n"  # both
        "four,a.png,,bad tenant!\n"
        "one,a.png,,\n"  # repeated id
        "six,a.png,,,extra\n"  # more values than columns
        ",,https://example.com/b.png,\n"  # id defaults to the url
    )
    items = read_items(manifest)
    assert items[0].source == str(tmp_path / "a.png") and items[0].tenant == "acme" and not items[0].is_bad
    assert [(i.row, i.error_field) for i in items if i.is_bad] == [
        (2, "path"),
        (3, "path"),
        (4, "tenant"),
        (5, "id"),
        (6, "manifest"),
    ]
    assert "neither a path nor a url" in items[1].error and "first on row 1" in items[4].error
    assert items[6].id == "https://example.com/b.png" and items[6].kind == "url"


def test_a_jsonl_line_that_is_not_an_object_is_its_rows_error_and_parquet_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": 7, "path": "/x.png"}\nnot json\n[1, 2]\n{"path": 5}\n')
    items = read_items(manifest)
    assert items[0].id == "7" and not items[0].is_bad
    assert [i.error_field for i in items[1:]] == ["manifest", "manifest", "path"]
    assert "not JSON" in items[1].error and "not an object" in items[2].error and "string" in items[3].error
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["/a.png", None], "tenant": ["t1", None]}), parquet)
    items = read_items(parquet)
    assert items[0].tenant == "t1" and items[1].error_field == "path"


@pytest.mark.parametrize(
    ("content", "name", "field", "words"),
    [
        (None, "absent.jsonl", "input", "does not exist"),
        ("id,path,colour\nx,a.png,red\n", "m.csv", "manifest", "unknown column(s) ['colour']"),
        ('{"id": "x"}\n', "m.jsonl", "manifest", "no 'path' or 'url' column"),
        ("not parquet", "m.parquet", "manifest", "cannot be read as parquet"),
        ("x", "m.txt", "input", "neither a folder nor a manifest"),
    ],
)
def test_a_manifest_the_job_cannot_read_is_a_config_error_naming_it(tmp_path, content, name, field, words):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        read_items(path)
    assert raised.value.field == field and words in raised.value.reason


def test_request_ids_derive_from_item_ids_and_are_always_valid():
    assert batch_request_id("more/astronaut.png") == batch_request_id("more/astronaut.png")
    assert batch_request_id("cup_1.png") == "batch:cup_1.png"
    odd = batch_request_id("a b/ç" + "x" * 300)
    assert odd.startswith("batch:sha256:") and REQUEST_ID_PATTERN.fullmatch(odd)
    assert batch_request_id("a b") != batch_request_id("a  b")


# -- the gathered cheap tier and the actor class, without Ray -------------------------------------


def test_the_gathered_tier_runs_concurrent_images_together_and_never_waits_for_one_that_left(tmp_path):
    model = write_colour_model(tmp_path / "colour.onnx")
    tier = GatheredOnnxTier(
        {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32}, tmp_path, 8
    )
    red, blue = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255

    async def three_and_one_leaves():
        tier.expect(4)
        asyncio.get_running_loop().call_soon(tier.leave)  # one analysis fails before the tier
        return await asyncio.wait_for(asyncio.gather(*(tier.predict(x) for x in (red, blue, red))), 10)

    results = asyncio.run(three_and_one_leaves())
    assert [r.detections.class_names[int(r.detections.class_id[0])] for r in results] == [
        "red",
        "blue",
        "red",
    ]
    assert tier.runs == 1

    async def one_of_two_held_up():  # the other never comes (say, it waits for decode budget)
        tier.expect(2)
        return await asyncio.wait_for(tier.predict(blue), 10)

    alone = asyncio.run(one_of_two_held_up()).detections
    assert alone.class_names[int(alone.class_id[0])] == "blue" and tier.runs == 2


def test_the_actor_runs_the_services_pipeline_on_a_numpy_batch(tmp_path):
    folder = photo_folder(tmp_path)
    items = read_items(folder)
    args = colour_args(tmp_path)
    args["policies"] = {"privacy": {"faces": "keep", "text": "keep"}}  # the Ray test below redacts
    analyzer = BatchAnalyzer(parse_app_config(args))
    columns = items[0].as_record().keys()
    batch = {c: np.array([item.as_record()[c] for item in items]) for c in columns}
    records = [json.loads(text) for text in analyzer(batch)["result"]]
    assert [r["id"] for r in records] == [i.id for i in items]
    broken = records[-1]
    assert broken["status"] == "error" and broken["error_field"] == "image" and broken["error_kind"]
    for record in records[:-1]:
        assert record["status"] == "done" and record["request_id"] == batch_request_id(record["id"])
        stages = [s["stage"] for s in record["trace"]["steps"]]
        assert stages[:3] == ["input", "onnx:colour", "policy:thresholds"]
        assert record["decision"] == record["trace"]["decision"]
    assert analyzer.tiers["colour"].runs == 1  # three images, one ONNX Runtime call


# -- the job on Ray Data ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():  # left up by an earlier test in this process (a Ray API that auto-inits)
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_batch_run_writes_every_items_decision_and_trace_and_a_rerun_queues_nothing_twice(
    tmp_path, local_ray, capsys
):
    from visionroute.cli import main

    folder, config = photo_folder(tmp_path), serve_config_file(tmp_path)
    out = tmp_path / "out"
    command = ["batch", "run", str(folder), "--out", str(out), "--config", str(config), "--no-progress"]
    assert main(command) == 0
    assert (
        "4 in the input, 0 finished before (skipped), 3 analysed, 1 errors (image 1)"
        in capsys.readouterr().out
    )
    parquet, jsonl = read_results(out), jsonl_records(out)
    assert (
        sorted(r["id"] for r in parquet)
        == sorted(r["id"] for r in jsonl)
        == [i.id for i in read_items(folder)]
    )
    by_id = {r["id"]: r for r in jsonl}
    assert (
        by_id["more/broken.png"]["status"] == "error" and by_id["more/broken.png"]["error_field"] == "image"
    )
    done = [r for r in parquet if r["status"] == "done"]
    assert len(done) == 3
    for record in done:
        assert (
            record["decision"] in ("accept", "review")
            and record["trace"]["steps"][1]["stage"] == "onnx:colour"
        )
        assert record["answer"] == by_id[record["id"]]["answer"] and record["answer"][0]["label"] in LABELS
    queued = {r["id"]: r["review_item_id"] for r in done if r["decision"] == "review"}
    assert queued, "real photos are not confidently red, green or blue: some go to review"
    for record in done:
        if record["decision"] == "review":  # privacy ran before the queue write, as in the service
            assert [s["stage"] for s in record["trace"]["steps"]][-2:] == ["privacy:redact", "review_queue"]
    items = review_items(tmp_path)
    assert sorted(i.id for i in items) == sorted(queued.values())

    lines = (out / JSONL_NAME).read_text().count("\n")
    assert main(command) == 0  # a rerun: everything is finished
    assert "4 finished before (skipped), 0 analysed" in capsys.readouterr().out
    assert (out / JSONL_NAME).read_text().count("\n") == lines

    shutil.rmtree(out)  # even without the output, an image id never makes a second review item
    assert main(command) == 0
    again = {r["id"]: r["review_item_id"] for r in jsonl_records(out) if r.get("decision") == "review"}
    assert again == queued
    assert sorted(i.id for i in review_items(tmp_path)) == sorted(queued.values())


@pytest.mark.slow
def test_a_jsonl_manifests_bad_rows_are_their_own_errors_and_the_job_goes_on(tmp_path, local_ray):
    from router.batch.job import run_batch

    for name in PHOTOS[:2]:
        (tmp_path / f"{name}.png").write_bytes(photo_png(name))
    rows = [
        {"id": "cup", "path": "coffee.png", "tenant": "acme"},
        {"id": "cat", "path": str(tmp_path / "chelsea.png")},
        {"path": "missing.png"},
        {"id": "web", "url": "http://127.0.0.1:9/x.png"},  # URL fetching is off in this config
        {"id": "cup", "path": "chelsea.png"},
        {"id": "cup2", "path": "coffee.png", "task": "text"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    config = parse_app_config(colour_args(tmp_path))
    summary = run_batch(config, manifest, tmp_path / "out", progress=False, batch_size=4)
    assert (summary.total, summary.done, summary.errors) == (7, 2, 5)
    records = {r["row"]: r for r in read_results(tmp_path / "out")}
    assert records[1]["status"] == "done" and records[1]["tenant"] == "acme" and records[1]["id"] == "cup"
    assert records[2]["status"] == "done" and records[2]["tenant"] == "default"
    errors = {row: (r["error_field"], r["error"]) for row, r in records.items() if r["status"] == "error"}
    assert errors[3][0] == "path" and "does not exist" in errors[3][1]
    assert errors[4][0] == "url" and "turned off" in errors[4][1]
    assert errors[5][0] == "id" and "repeated" in errors[5][1]
    assert errors[6][0] == "task" and "unknown task 'text'" in errors[6][1]
    assert errors[7][0] == "manifest"
    assert summary.error_fields == {"path": 1, "url": 1, "id": 1, "task": 1, "manifest": 1}


def test_an_escalation_goes_to_the_vlm_stage_with_the_actors_share_of_its_concurrency(tmp_path):
    from tests.router.colour_model import solid_png

    args = colour_args(tmp_path)
    args["cascades"]["colour"]["vlm"] = {  # nothing listens there: the stage records the failure
        "endpoint": "http://127.0.0.1:9/v1",
        "labels": LABELS,
        "max_attempts": 1,
        "connect_timeout_s": 0.5,
        "request_timeout_s": 2.0,
        "total_timeout_s": 2.0,
        "max_concurrency": 8,
    }
    args["cascades"]["colour"]["vlm_replicas"] = 2
    args["policies"] = {"privacy": {"faces": "keep", "text": "keep"}}  # no detectors to load here
    analyzer = BatchAnalyzer(parse_app_config(args), actors=4)
    vlm = analyzer.service.analyze.vlm_tiers["colour"].stage
    assert vlm.config.max_concurrency == 4  # 8 slots x 2 replicas over 4 actors
    (tmp_path / "grey.png").write_bytes(solid_png((128, 128, 128)))  # 1/3 each: escalated
    record = asyncio.run(
        analyzer.analyze_rows(
            [
                {
                    "id": "grey",
                    "row": 1,
                    "source": str(tmp_path / "grey.png"),
                    "kind": "path",
                    "tenant": "",
                    "task": "",
                    "error": "",
                    "error_field": "",
                }
            ]
        )
    )[0]
    steps = {s["stage"]: s for s in record["trace"]["steps"]}
    assert steps["policy:thresholds"]["decision"] == "escalate"
    assert steps["vlm"]["error"] and record["decision"] == "review" and record["review_item_id"]
