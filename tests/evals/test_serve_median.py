"""The median of several bench serve runs (evals/benchmarks/serve_median.py): ratios against each
run's own floor, the median per column, the verdicts, and a clear error for a run without them."""

import json

import pytest

from evals.benchmarks.serve_median import SHIPPED, main, median_table, ratios, shipped_key
from visionroute.errors import InputError


def run(floor_p50, floor_rps, http_p50, http_rps, batch_vs_single, load=(4.0, 6.0)):
    face = {"sequential": {"p50_ms": http_p50}, "requests_per_s": http_rps}
    return {
        "floor": {"sequential": {"p50_ms": floor_p50}, "requests_per_s": floor_rps},
        "service": {SHIPPED: {"http": face, "grpc": face, "batch": {"vs_single": batch_vs_single}}},
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


def test_the_shipped_config_is_read_from_serve_config_and_another_can_be_judged(tmp_path):
    config = tmp_path / "serve_config.yaml"
    config.write_text(
        "applications:\n  - args:\n      cascades: {classify: {placement: ingress}}\n"
        "      retrieval: {enabled: true, index_analysed: true}\n"
    )
    assert shipped_key(config) == "ingress/indexing on"
    config.write_text("applications:\n  - args:\n      cascades: {classify: {}}\n")
    assert shipped_key(config) == "deployment/indexing off"
    other = run(50.0, 20.0, 60.0, 10.0, 1.9)
    other["service"] = {"ingress/indexing off": other["service"][SHIPPED]}
    assert "config: ingress/indexing off" in median_table([("x", other)], "ingress/indexing off")
    path = tmp_path / "bench-1.json"
    path.write_text(json.dumps(other))
    assert main(["--config", "ingress/indexing off", str(path)]) == 0
    with pytest.raises(InputError, match="--placement ingress"):
        main(["--config", "ingress/indexing on", str(path)])


def test_the_command_line_names_a_bad_argument_without_a_traceback(tmp_path, capsys):
    from evals.benchmarks.serve_median import _main_with_clear_errors

    assert _main_with_clear_errors(["--config"]) == 2
    assert "serve_median: config: --config needs a key" in capsys.readouterr().err
    path = tmp_path / "bench-1.json"
    path.write_text(json.dumps({"floor": {}, "service": {}}))
    assert _main_with_clear_errors([str(path)]) == 2
    assert "bench-1: bench-1 has no floor or no" in capsys.readouterr().err
