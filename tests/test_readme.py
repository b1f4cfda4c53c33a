"""The README's promises: two set-up commands, CI runs the test one, listed commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)


def test_setup_is_two_commands_and_ci_runs_the_test_one():
    commands = [
        line.split("#")[0].strip() for line in code_block_after("## Set-up").splitlines() if line.strip()
    ]
    assert commands == ["./scripts/serve.sh", "./scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci
    for script in (
        "serve.sh",
        "test.sh",
        "bootstrap.sh",
        "vllm_env.sh",
        "browser_deps.sh",
        "postgres_deps.sh",
    ):
        path = REPO / "scripts" / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


def readme_commands() -> list[list[str]]:
    """``visionroute a b|c`` -> [a, b], [a, c]; ``visionroute a | b`` -> [a], [b]; arguments dropped."""
    commands = []
    for line in code_block_after("## Command line").splitlines():
        if not line.startswith("visionroute"):
            continue
        text = line.split("#")[0].removeprefix("visionroute").strip()
        for alternative in (part.strip() for part in text.split(" | ")):
            words = [w for w in alternative.split() if re.fullmatch(r"[a-z|-]+", w)]
            if words[0] in ("models", "bench", "retrieval", "review"):
                commands += [[words[0], sub] for sub in words[1].split("|")]
            else:
                commands.append(words[:1])
    return commands


@pytest.mark.parametrize("command", readme_commands(), ids=" ".join)
def test_every_command_in_the_readme_exists(command):
    result = subprocess.run(
        [sys.executable, "-m", "visionroute.cli", *command, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
