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
