from pathlib import Path

import pytest
import yaml

from router.config import AppConfig, parse_app_config
from visionroute.errors import ConfigError

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


def test_serve_config_yaml_is_valid_and_matches_the_embedded_default():
    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    config = parse_app_config(args)
    assert set(config.cascades) == {"classify", "text"}
    assert config.cascades["classify"].tier.model == AppConfig().cascades["classify"].tier.model


@pytest.mark.parametrize(
    "args, message",
    [
        ({"cascadez": {}}, "unknown config key 'cascadez'"),
        (
            {"cascades": {"classify": {"tier": {"model": "m", "bogus": 1}}}},
            "unknown config key 'cascades.classify.tier.bogus'",
        ),
        ({"default_task": "ocr"}, "default_task 'ocr' is not one of the cascades"),
        ({"limits": {"allowed_formats": ["PNG", "HEIC"]}}, "unknown formats \\['HEIC'\\]"),
        ({"limits": {"max_pixels": -1}}, "limits.max_pixels"),
        (
            {
                "cascades": {
                    "classify": {
                        "tier": {"model": "m"},
                        "policy": {"accept_threshold": 0.2, "escalate_threshold": 0.5},
                    }
                }
            },
            "must not exceed",
        ),
    ],
)
def test_bad_config_names_the_key_and_the_reason(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_app_config(args)


def test_paths_are_resolved_to_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_app_config({"models_dir": "models", "review": {"path": "queue"}})
    assert config.models_dir == tmp_path / "models" and config.review.path == tmp_path / "queue"
