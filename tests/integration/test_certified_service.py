"""The threshold version a live trace names is the one `visionroute check-config` prints.

Regression: each replica used to re-validate the dumped config and append the certificate's
suffix a second time (``colour-v1+temperature@…+temperature@…``), a version that exists nowhere.

The task (``colour_certified``: thresholds from a real ``visionroute calibrate`` artefact) is one
of the session's colour service (tests/integration/colour_service.py), not a service of its own.
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from tests.integration.colour_service import CERTIFIED
from tests.integration.serve_process import REPO
from tests.router.colour_model import solid_png

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_live_trace_names_the_threshold_version_check_config_printed(colour_service):
    printed = subprocess.run(
        [sys.executable, "-m", "visionroute.cli", "check-config", str(colour_service.config_path)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    version = re.search(rf"^\s*{CERTIFIED}: thresholds (\S+)$", printed, re.MULTILINE).group(1)
    assert version.startswith("colour-v1+temperature@") and version.count("+") == 1
    response = httpx.post(
        colour_service.url + "/v1/analyze",
        files={"image": ("r.png", solid_png((255, 0, 0)), "image/png")},
        data={"task": CERTIFIED},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["task"] == CERTIFIED
    step = next(s for s in response.json()["trace"]["steps"] if s["stage"] == "policy:thresholds")
    assert step["policy_version"] == version
