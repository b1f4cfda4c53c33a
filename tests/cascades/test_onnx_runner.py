"""OnnxModel's session options: ONNX Runtime's thread spinning is the user's choice."""

from __future__ import annotations

import pytest

from cascades.onnx_runner import OnnxModel
from tests.router.colour_model import write_colour_model


def config_entry(options, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except Exception:  # ONNX Runtime raises when the entry was never set
        return None


@pytest.mark.parametrize("spinning, expected", [(True, None), (False, "0")])
def test_thread_spinning_reaches_the_session(tmp_path, spinning, expected):
    model = OnnxModel(write_colour_model(tmp_path / "colour.onnx"), thread_spinning=spinning)
    options = model.session.get_session_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        # unset: ONNX Runtime's default (its threads spin); "0": they sleep between inferences
        assert config_entry(options, key) in ((expected,) if expected else (None, "", "1"))


def test_threads_sleep_between_inferences_by_default(tmp_path):
    # Spinning threads cost ~3x the CPU per inference on a shared 2-core machine
    # (evals/benchmarks/ort_threads.py): the session and the tier's config both default to off.
    from cascades.onnx_stage import OnnxStageConfig

    model = OnnxModel(write_colour_model(tmp_path / "colour.onnx"))
    options = model.session.get_session_options()
    assert config_entry(options, "session.intra_op.allow_spinning") == "0"
    assert OnnxStageConfig(model="colour").thread_spinning is False
