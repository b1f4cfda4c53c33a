"""The median of several bench serve runs (evals/benchmarks/serve_median.py): ratios against each
run's own floor, the median per column, the verdicts, and a clear error for a run without them."""

import json

import pytest

from evals.benchmarks.serve_median import main, median_table, ratios
from visionroute.errors import InputError


def run(floor_p50, floor_rps, http_p50, http_rps, batch_vs_single, load=(4.0, 6.0)):
    face = {"sequential": {"p50_ms": http_p50}, "requests_per_s": http_rps}
    return {
        "floor": {"sequential": {"p50_ms": floor_p50}, "requests_per_s": floor_rps},
        "service": {
            "deployment/indexing on": {"http": face, "grpc": face, "batch": {"vs_single": batch_vs_single}}
        },
        "load_average": {"start": load[0], "end": load[1]},
    }


def test_each_run_is_judged_against_its_own_floor_and_the_median_decides():
    runs = [
        ("a", run(50.0, 20.0, 55.0, 19.0, 2.2)),  # 1.10x, 0.95x
        ("b", run(25.0, 40.0, 50.0, 20.0, 1.5)),  # 2.00x, 0.50x: a loaded floor would flatter us
        ("c", run(40.0, 30.0, 44.0, 28.5, 2.1)),  # 1.10x, 0.95x
    ]
    assert ratios(runs[1][1])["HTTP p50/floor"] == pytest.approx(2.0)
    table = median_table(runs)
    assert "| **median of 3** | **1.10** | **0.95** | **1.10** | **0.95** | **2.10** |" in table
    assert "| b (4 -> 6) |" in table
    assert "HTTP p50/floor 1.10 (<= 1.2: met)" in table and "batch/single 2.10 (>= 2: met)" in table


def test_a_run_without_the_shipped_config_is_named(tmp_path):
    with pytest.raises(InputError, match="indexing on") as error:
        ratios({"floor": {}, "service": {"ingress/indexing off": {}}}, "bench-1")
    assert error.value.field == "bench-1"
    path = tmp_path / "bench-1.json"
    path.write_text(json.dumps(run(50.0, 20.0, 60.0, 10.0, 1.9)))
    assert main([str(path)]) == 0
