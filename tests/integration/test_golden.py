"""The service answers a fixed request set exactly as recorded in golden_responses.json.

A deliberate change of behaviour re-records the file (``python -m tests.integration.golden
record``) so the diff is reviewed with the change; anything else that moves fails here.
"""

from __future__ import annotations

import difflib
import json

import pytest

from tests.integration.golden import GOLDEN_FILE, exchange, normalised
from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_http_and_grpc_answers_match_the_golden_responses(prepared_models_dir, tmp_path):
    service = ServeProcess(tmp_path, prepared_models_dir).start()
    try:
        results = normalised(exchange(service.url, service.grpc_target))
    finally:
        service.stop()
    expected = json.loads(GOLDEN_FILE.read_text())
    assert [r["name"] for r in results] == [r["name"] for r in expected]
    got = json.dumps(results, indent=1, sort_keys=True).splitlines()
    want = json.dumps(expected, indent=1, sort_keys=True).splitlines()
    diff = "\n".join(difflib.unified_diff(want, got, "golden", "now", lineterm="", n=2))
    assert not diff, "responses differ from golden_responses.json:\n" + diff[:20000]
