"""``visionroute rollout start --artefact``: a rollout of a stored calibration artefact, named by
its sha256 or by its JSON file, through the service core's admin call (no server)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.router.test_rollouts import ADMIN, build, rollout_config
from visionroute.cli import main

THRESHOLDS = {"version": "colour-v1+prod-0123456789ab", "accept_threshold": 0.5, "escalate_threshold": 0.2}
ARTEFACT = {
    "kind": "production-recalibration",
    "task": "colour",
    "tenant": None,
    "version": THRESHOLDS["version"],
}


class InProcessClient:
    """The admin API's POST /v1/rollouts, answered by the service core."""

    def __init__(self, service) -> None:
        self.service, self.bodies = service, []

    def call(self, method: str, path: str, json=None, params=None):
        assert (method, path) == ("POST", "/v1/rollouts")
        self.bodies.append(json)
        return asyncio.run(self.service.rollouts.start(ADMIN, json)).to_json()


@pytest.fixture
def cli(tmp_path, monkeypatch):
    service = build(rollout_config(tmp_path))
    client = InProcessClient(service)
    monkeypatch.setattr("visionroute.cli.rollout._client", lambda args: client)
    return service, client


def start(*extra: str) -> int:
    return main(["rollout", "start", "--task", "colour", "--json", *extra])


def test_a_rollout_starts_from_a_stored_artefact_named_by_sha256_or_by_file(cli, tmp_path, capsys):
    service, client = cli
    body = {**ARTEFACT, "thresholds": THRESHOLDS}
    sha = service.rollouts.artefacts.put(body, actor="recalibration rc_test")
    assert start("--artefact", sha, "--reason", "back to an earlier incumbent") == 0
    started = json.loads(capsys.readouterr().out)
    assert started["artefact"] == sha and started["mode"] == "shadow" and client.bodies[-1]["artefact"] == sha
    asyncio.run(service.rollouts.decide(ADMIN, started["id"], "rollback", None))
    exported = tmp_path / "artefact.json"
    exported.write_text(json.dumps(body, indent=2))  # any formatting: the canonical text is hashed
    assert start("--artefact", str(exported), "--mode", "canary") == 0
    assert json.loads(capsys.readouterr().out)["artefact"] == sha


def test_a_bad_artefact_flag_names_the_field(cli, tmp_path, capsys):
    _, client = cli
    assert start("--artefact", "not-a-sha-nor-a-file") == 2
    assert "artefact" in capsys.readouterr().err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**ARTEFACT, "version": "never-stored", "thresholds": THRESHOLDS}))
    assert start("--artefact", str(unknown)) == 2  # the service serves only artefacts a job stored
    assert "error (artefact): no stored calibration artefact" in capsys.readouterr().err
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    assert start("--artefact", str(not_json)) == 2
    assert "not readable JSON" in capsys.readouterr().err
    assert len(client.bodies) == 1  # only the well-formed request reached the service
