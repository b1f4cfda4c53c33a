"""Where VisionRoute keeps prepared models and durable state by default.

Everything lives under ``$VISIONROUTE_HOME`` (default ``~/.visionroute``); config can point
any of it elsewhere. Paths are resolved when config is parsed, in the process that runs the
app builder, so every Ray replica sees the same absolute paths.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("VISIONROUTE_HOME", Path.home() / ".visionroute")).expanduser()


def models_dir() -> Path:
    return home() / "models"


def data_dir() -> Path:
    return home() / "data"
