"""``python -m evals.benchmarks.loop``: the same as ``visionroute bench loop``."""

from evals.benchmarks.loop.cli import main

raise SystemExit(main())
