"""``visionroute index <folder>``, ``retrieval search|stats|compact`` through the real entry point."""

from __future__ import annotations

import json

import yaml
from PIL import Image

from visionroute.cli import main


def test_index_folder_search_and_compact(tmp_path, conse_config, photos, capsys):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for name in ("coffee", "chelsea", "rocket"):
        Image.fromarray(photos[name]).save(folder / f"{name}.jpg")
    Image.fromarray(photos["horse"]).save(folder / "nested" / "horse.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    config = tmp_path / "retrieval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "retrieval": {
                    "index_dir": str(tmp_path / "index"),
                    "embedder": json.loads(conse_config.model_dump_json()),
                }
            }
        )
    )

    assert main(["index", str(folder), "--config", str(config), "--tag", "demo"]) == 1  # one file failed
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["indexed"] == 4 and summary["failed"] == 1 and summary["items"] == 4
    (folder / "broken.jpg").unlink()
    assert main(["index", str(folder), "--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["replaced"] == 4 and summary["items"] == 4  # same content: replaced, not doubled

    assert main(["retrieval", "search", "a cup of coffee", "-k", "1", "--config", str(config)]) == 0
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["metadata"]["extra"]["path"] == "coffee.jpg"
    assert main(["retrieval", "compact", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["after"]["items"] == 4
    assert main(["index", str(tmp_path / "missing"), "--config", str(config)]) == 2
