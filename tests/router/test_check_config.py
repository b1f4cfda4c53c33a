"""check-config (and `visionroute serve`, which runs it first) catches what would fail at deploy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from router.serve_runner import Endpoints, child_environment, endpoints_of

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "visionroute.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def shipped() -> dict:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_unknown_model_name_is_refused_naming_the_setting(tmp_path):
    config = shipped()
    config["applications"][0]["args"]["models_dir"] = str(tmp_path / "models")
    config["applications"][0]["args"]["cascades"]["classify"]["tier"]["model"] = "efficientnet_lite1"
    result = run_cli("check-config", str(write(tmp_path, config)))
    assert result.returncode == 2, result.stdout
    assert "cascades.classify.tier.model: unknown model 'efficientnet_lite1'" in result.stderr
    assert "efficientnet_lite0" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_model_file_is_refused(tmp_path):
    config = shipped()
    config["applications"][0]["args"]["cascades"]["text"]["tier"]["model"] = str(tmp_path / "nope.onnx")
    result = run_cli("check-config", str(write(tmp_path, config)))
    assert result.returncode == 2
    assert "cascades.text.tier.model: ONNX model file" in result.stderr and "does not exist" in result.stderr


def test_grpc_without_keys_or_allow_insecure_bind_is_refused(tmp_path):
    config = shipped()
    del config["applications"][0]["args"]["security"]
    result = run_cli("check-config", str(write(tmp_path, config)))
    assert result.returncode == 2, result.stdout
    assert "(security.api_keys)" in result.stderr and "grpc_options (port 9000)" in result.stderr
    assert "security.allow_insecure_bind" in result.stderr


def test_http_beyond_loopback_without_keys_is_refused_even_without_grpc(tmp_path):
    config = shipped()
    del config["applications"][0]["args"]["security"]
    del config["grpc_options"]
    config["http_options"]["host"] = "0.0.0.0"
    result = run_cli("check-config", str(write(tmp_path, config)))
    assert result.returncode == 2 and "HTTP on 0.0.0.0" in result.stderr
    del config["http_options"]["host"]  # Serve's default for a config file is 0.0.0.0 too
    assert "HTTP on 0.0.0.0" in run_cli("check-config", str(write(tmp_path, config))).stderr
    config["http_options"]["host"] = "127.0.0.1"
    assert run_cli("check-config", str(write(tmp_path, config))).returncode == 0


def test_a_valid_config_prints_what_was_checked(tmp_path):
    config = shipped()
    config["applications"][0]["args"]["models_dir"] = str(tmp_path / "models")
    result = run_cli("check-config", str(write(tmp_path, config)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "listens: HTTP 127.0.0.1:8000, gRPC on port 9000" in out
    assert "no API keys (auth off), allow_insecure_bind" in out
    assert "cascades.classify.tier.model: efficientnet_lite0: packaged, not prepared yet" in out
    assert out.rstrip().endswith(": valid")


def test_serve_refuses_a_bad_config_before_starting_ray(tmp_path):
    config = shipped()
    config["applications"][0]["args"]["cascades"]["classify"]["tier"]["model"] = "no_such_model"
    started = time.monotonic()
    result = run_cli("serve", "--config", str(write(tmp_path, config)))
    assert result.returncode == 2 and "unknown model 'no_such_model'" in result.stderr
    assert "starting:" not in result.stdout and time.monotonic() - started < 60


def test_models_list_before_prepare_says_what_is_missing(tmp_path):
    result = run_cli("models", "list", "--dir", str(tmp_path / "models"))
    assert result.returncode == 0
    assert "does not exist yet" in result.stdout
    assert "efficientnet_lite0\tnot prepared" in result.stdout and "ppocr_det\tnot prepared" in result.stdout
    assert f"visionroute models prepare --dir {tmp_path / 'models'}" in result.stdout


def test_policies_check_says_what_it_checked(tmp_path):
    result = run_cli("policies", "check", str(REPO / "serve_config.yaml"))
    assert result.returncode == 0
    assert "no policy set configured" in result.stdout and "0 policy set(s) checked" in result.stdout
    config = shipped()
    config["applications"][0]["args"]["policies"] = {"version": "p-7"}
    result = run_cli("policies", "check", str(write(tmp_path, config)))
    assert "args.policies: policy set 'p-7' is valid" in result.stdout and "1 policy set(s)" in result.stdout
    missing = run_cli("policies", "check", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize(
    "document, expected",
    [
        ({}, Endpoints("0.0.0.0", 8000, "/", None)),
        (
            {
                "http_options": {"host": "127.0.0.1", "port": 8123},
                "grpc_options": {"port": 9123, "grpc_servicer_functions": ["a.b"]},
                "applications": [{"import_path": "router.app:build_app", "route_prefix": "/vr"}],
            },
            Endpoints("127.0.0.1", 8123, "/vr", 9123),
        ),
        ({"grpc_options": {"port": 9000}}, Endpoints("0.0.0.0", 8000, "/", None)),  # no servicers: off
    ],
)
def test_endpoints_follow_serves_defaults(document, expected):
    assert endpoints_of(document) == expected


def test_ready_line_and_probe_url():
    endpoints = Endpoints("0.0.0.0", 8000, "/vr/", 9000)
    assert endpoints.probe_url == "http://127.0.0.1:8000/vr/readyz"
    assert endpoints.ready_line() == "VisionRoute ready on http://0.0.0.0:8000 (gRPC :9000)"
    assert Endpoints("127.0.0.1", 8000, "/", None).ready_line().endswith("(gRPC off)")


def test_the_single_machine_start_keeps_ray_on_loopback_with_token_auth():
    env, notes = child_environment({})
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_AUTH_MODE"] == "token"
    assert notes == []
    env, notes = child_environment({"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "10.0.0.5:6379"})
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env  # a cluster keeps its own settings
    assert any("token authentication is off" in note for note in notes)
