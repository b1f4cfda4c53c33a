import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "visionroute.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def test_check_config_accepts_the_shipped_config():
    result = run_cli("check-config", str(REPO / "serve_config.yaml"))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_an_unknown_key_is_a_clear_cli_error_naming_it(tmp_path):
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["cascades"]["classify"]["policy"]["acept_threshold"] = 0.9
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "unknown config key 'cascades.classify.policy.acept_threshold'" in result.stderr
    assert "Traceback" not in result.stderr
