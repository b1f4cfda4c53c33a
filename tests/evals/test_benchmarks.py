"""The benchmarks (evals/benchmarks/): their commands keep their names and flags, and the fast
ones run: the audit estimator's coverage on simulated runs is at least nominal."""

from __future__ import annotations

import json

import pytest

from evals.benchmarks.audit import simulate_coverage
from visionroute.cli import build_parser, main

# name -> flags each `visionroute bench <name>` accepts (what the README and docs show)
BENCH_FLAGS = {
    "serve": ["--models-dir", "--requests", "--clients", "--max-batch-size", "--placement"],
    "calibration": ["--splits", "--alpha", "--delta", "--method", "--seed", "--json"],
    "retrieval": [
        "--parts",
        "--n",
        "--dim",
        "--queries",
        "--ivfpq-1m",
        "--clip-model",
        "--clip-pretrained",
        "--images",
        "--batch-size",
        "--models-dir",
    ],
    "vlm": ["--endpoint", "--model", "--requests", "--concurrency"],
    "cascade": ["--work-dir", "--json", "--plot", "--concurrency", "--limit", "--alpha"],
    "audit": ["--error-rates", "--accepted", "--fraction", "--confidence", "--runs", "--seed", "--json"],
}


@pytest.mark.parametrize("name", sorted(BENCH_FLAGS))
def test_every_bench_command_keeps_its_name_and_flags(name, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["bench", name, "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert [flag for flag in BENCH_FLAGS[name] if flag not in usage] == []


def test_bench_audit_prints_the_coverage_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["bench", "audit", "--error-rates", "0.05", "--runs", "200", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "audit estimator coverage: 200 simulated runs" in printed and "0.050" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["error_rate"] == 0.05 and rows[0]["runs"] == 200


@pytest.mark.parametrize("error_rate", [0.01, 0.05, 0.2])
def test_coverage_over_simulated_runs_is_at_least_nominal(error_rate):
    result = simulate_coverage(error_rate, accepted=4000, fraction=0.05, confidence=0.9, runs=1500, seed=1)
    # Clopper-Pearson is conservative; allow Monte Carlo noise (sd ~0.008 at 1500 runs).
    assert result["upper_coverage"] >= 0.9 - 0.02
    assert result["lower_coverage"] >= 0.9 - 0.02
    assert result["two_sided_coverage"] >= 0.8 - 0.02
