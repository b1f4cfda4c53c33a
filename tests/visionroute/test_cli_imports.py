"""Read-only CLI commands start light: no Ray, torch, FAISS (nor scipy, openai) on their path.

Checked by what a fresh interpreter has imported after running the command, not by timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "torch", "faiss", "sentence_transformers", "transformers", "timm", "scipy", "openai", "cv2")

PROBE = """
import contextlib, io, json, sys
from visionroute.cli import main
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        code = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = exc.code
heavy = json.loads(sys.argv[2])
print(json.dumps({"code": code, "output": out.getvalue(), "imported": sorted(m for m in heavy if m in sys.modules)}))
"""


def run_probe(argv: list[str]) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["models", "list", "--dir", "{tmp}"],
        ["check-config", str(REPO / "serve_config.yaml")],
        ["policies", "check", str(REPO / "serve_config.yaml")],
        ["keys", "new", "--tenant", "acme"],
        ["serve", "--help"],
        ["index", "--help"],
        ["bench", "decode", "--help"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_read_only_commands_do_not_import_heavy_libraries(argv, tmp_path):
    argv = [str(tmp_path) if word == "{tmp}" else word for word in argv]
    result = run_probe(argv)
    assert result["code"] in (0, None), result
    assert result["output"], "the command printed nothing"
    assert result["imported"] == [], f"{' '.join(argv)} imported {result['imported']}"


def test_the_command_table_matches_what_the_modules_register():
    """--help lists commands from visionroute.cli.COMMANDS without importing their modules."""
    from visionroute.cli import COMMAND_MODULES, COMMANDS, build_parser

    full = build_parser()  # every module registers itself
    registered = set(full._subparsers._group_actions[0].choices) - {"bench"}
    assert registered == set(COMMANDS)
    assert {module for module, _ in COMMANDS.values()} <= set(COMMAND_MODULES)
    for name, (module, _) in COMMANDS.items():  # each command is registered by the module named
        import argparse
        import importlib

        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers()
        importlib.import_module(module).register(subparsers, argparse.ArgumentParser().add_subparsers())
        assert name in subparsers.choices, f"{module} does not register {name!r}"
