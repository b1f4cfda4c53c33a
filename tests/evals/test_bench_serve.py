"""``visionroute bench serve``: its flags, the per-stage breakdown's arithmetic, and a ``--quick``
run end to end (raw ONNX Runtime, the Ray Serve floor, the real service over HTTP and gRPC).
Figures are printed, never asserted: the machine is shared."""

from __future__ import annotations

import json

import pytest

from evals.benchmarks.serve import _router_lines, breakdown, cheap_path, service_args
from visionroute.cli import build_parser, main


def test_bench_serve_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", "--help"])
    usage = capsys.readouterr().out
    flags = ["--placement", "--indexing", "--faces", "--intra-op-threads", "--quick", "--json", "--requests"]
    flags += ["--batch-images", "--router", "--work-dir"]
    assert [flag for flag in flags if flag not in usage] == []


def test_breakdown_parts_sum_to_the_total_p50():
    samples = [
        (
            total,
            {
                "server_ms": total - 5.0,
                "trace": {
                    "steps": [
                        {"stage": "input", "latency_ms": 2.0},
                        {"stage": "onnx:classify", "latency_ms": 9.0},
                        {"stage": "policy:thresholds", "latency_ms": 0.0},
                    ]
                },
            },
        )
        for total in (20.0, 24.0, 30.0)
    ]
    parts = breakdown(samples)
    total = parts.pop("total_p50_ms")
    assert total == 24.0
    assert parts["onnx"] == 9.0 and parts["input"] == 2.0
    assert parts["ingress other (parse, budget, trace, JSON)"] == pytest.approx(24.0 - 5.0 - 11.0)
    assert sum(parts.values()) == pytest.approx(total)


def test_service_args_follow_the_shipped_config(tmp_path):
    off = service_args(tmp_path / "m", tmp_path, "ingress", False, 8, 1)
    on = service_args(tmp_path / "m", tmp_path, "deployment", True, 8, None)
    assert off["retrieval"]["enabled"] is False and off["cascades"]["classify"]["placement"] == "ingress"
    assert off["cascades"]["classify"]["tier"]["intra_op_threads"] == 1
    assert on["retrieval"] == {**on["retrieval"], "enabled": True, "index_analysed": True}
    assert on["review"]["path"] == str(tmp_path / "review")
    assert on["cascades"]["classify"]["tier"]["model"] == "efficientnet_lite0"


def test_service_args_serve_the_router_with_the_calibration_it_was_fitted_on(tmp_path):
    router, calibration = tmp_path / "router.json", tmp_path / "calibration.json"
    args = service_args(tmp_path / "m", tmp_path, "ingress", False, 8, None, router=(router, calibration))
    classify = args["cascades"]["classify"]
    assert classify["router"] == {"path": str(router)}
    assert classify["tier"]["calibration"] == str(calibration)
    assert (
        "router"
        not in service_args(tmp_path / "m", tmp_path, "ingress", False, 8, None)["cascades"]["classify"]
    )


def _body(decision, router_ms=None):
    steps = [{"stage": "onnx:classify", "latency_ms": 9.0}]
    if router_ms is not None:
        steps.append(
            {
                "stage": "router",
                "latency_ms": router_ms + 0.5,
                "details": {"pricing": {"features_ms": router_ms}},
            }
        )
    return {"decision": decision, "trace": {"steps": steps}}


def test_cheap_path_and_router_lines_compare_off_with_on():
    off = [(10.0, _body("accept")), (12.0, _body("accept")), (90.0, _body("review"))]
    on = [(13.0, _body("accept", 2.5)), (15.0, _body("accept", 3.5)), (95.0, _body("review", 3.0))]
    assert cheap_path(off) == {"accept_p50_ms": 11.0, "accepted": 2}
    assert cheap_path(on)["router_features_p50_ms"] == 3.0

    def entry(samples, rate):
        return {"http": {"breakdown": breakdown(samples), "requests_per_s": rate, **cheap_path(samples)}}

    results = {
        "service": {
            "ingress/indexing off": entry(off, 20.0),
            "ingress/indexing off/router on": entry(on, 19.0),
        }
    }
    [line] = _router_lines(results)
    assert "router stage p50 3.50 ms (<= 2: NOT met)" in line
    assert "cheap path (accepted) p50 off/on 11.0/14.0 ms (+3.0" in line and "20.0/19.0 req/s" in line


@pytest.mark.slow
@pytest.mark.server
def test_bench_serve_quick_runs_end_to_end(prepared_models_dir, tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = main(
        [
            "bench",
            "serve",
            "--quick",
            "--requests",
            "8",
            "--models-dir",
            str(prepared_models_dir),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert results["raw"]["batched_images_per_s"] > 0
    assert results["floor"]["requests_per_s"] > 0
    ours = results["service"]["ingress/indexing off"]
    batch = ours.pop("batch")  # the batch API's images/s against the single-image API's (HTTP)
    assert batch["images_per_s"] > 0 and batch["failed_images"] == 0 and batch["vs_single"] > 0
    assert set(ours) == {"http", "grpc"}
    for face in ours.values():
        assert sum(face["decisions"].values()) > 0 and set(face["decisions"]) <= {
            "accept",
            "review",
            "escalate",
        }
        parts = dict(face["breakdown"])
        total = parts.pop("total_p50_ms")
        assert "onnx" in parts and "input" in parts
        assert sum(parts.values()) == pytest.approx(total)
    assert "ingress other (parse, budget, trace, JSON)" in ours["http"]["breakdown"]  # Server-Timing
    printed = capsys.readouterr().out
    assert "floor: minimal Serve app" in printed and "targets" in printed


def test_raw_and_floor_run_the_services_thread_spinning(tmp_path):
    # raw ONNX Runtime, the floor and the service on one session setting: a fair comparison
    from cascades.onnx_stage import OnnxStageConfig
    from evals.benchmarks.serve import shipped_thread_spinning

    args = service_args(tmp_path / "models", tmp_path, "deployment", False, 8, None)
    service = OnnxStageConfig(**args["cascades"]["classify"]["tier"])
    assert shipped_thread_spinning() is service.thread_spinning


def test_raw_and_floor_decode_the_bench_jpegs_as_the_service_does(tmp_path):
    # jpeg_at_model_size: DCT-scaled for the service with privacy keep, so for the floor too;
    # with redaction as configured (faces blurred) the service decodes them whole, and so the floor
    from evals.benchmarks.serve import shipped_jpeg_at_model_size
    from router.config import parse_app_config

    args = service_args(tmp_path / "models", tmp_path, "ingress", False, 8, None)
    config = parse_app_config(args)
    assert not config.policies.privacy.for_tenant("default").redacts
    assert shipped_jpeg_at_model_size() is config.limits.decode.jpeg_at_model_size
    assert shipped_jpeg_at_model_size(redaction=True) is False


def test_only_the_shipped_config_is_labelled_shipped_in_the_targets():
    from evals.benchmarks.serve import _targets
    from evals.benchmarks.serve_median import SHIPPED

    face = {"sequential": {"p50_ms": 48.0}, "requests_per_s": 36.0}
    results = {
        "raw": {"p50_ms": 12.0},
        "floor": {"sequential": {"p50_ms": 40.0}, "requests_per_s": 40.0},
        "service": {key: {"http": face} for key in ("ingress/indexing on", "deployment/indexing on")},
    }
    lines = _targets(results)
    shipped = [line for line in lines if "(shipped)" in line]
    assert len(shipped) == 1 and shipped[0].strip().startswith(f"{SHIPPED} (shipped), HTTP")
    assert "p50 / floor = 1.20 (<= 1.2: met); throughput / floor = 0.90 (>= 0.9: met)" in shipped[0]
    assert len([line for line in lines if "p50 / floor" in line]) == 2
