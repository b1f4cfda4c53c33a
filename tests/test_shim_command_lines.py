"""The old command lines of moved scripts keep working for one release (see SHIMS in
tests/test_import_graph.py): they run the new script, they do not exit 0 having done nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, pythonpath: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_old_train_digits_script_runs_the_new_one():
    """By path (as its docs said) and with -m: the new script's usage check answers."""
    for args in (["cascades/vlm/train_digits.py"], ["-m", "cascades.vlm.train_digits", "only-one-arg"]):
        done = _run(args, REPO, str(REPO))
        assert done.returncode == 1, done
        assert "usage: python examples/train_digits.py OUT_DIR INPUTS.npz" in done.stderr
        assert "moved to examples.train_digits" in done.stderr


def test_python_m_cascades_vlm_server_runs_the_new_module_as_main(tmp_path):
    """A stand-in examples.vllm_server (so no vLLM starts) shows what runs, and as __main__."""
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "__init__.py").write_text("")
    (tmp_path / "examples" / "vllm_server.py").write_text(
        "import sys\nprint('ran as', __name__, sys.argv[1:])\n"
    )
    done = _run(["-m", "cascades.vlm.server", "--flag"], tmp_path, f"{tmp_path}{os.pathsep}{REPO}")
    assert done.returncode == 0, done
    assert "ran as __main__ ['--flag']" in done.stdout
    assert "moved to examples.vllm_server" in done.stderr
