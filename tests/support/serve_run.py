"""``serve run`` for the tests' services, with Ray's dashboard off.

``python -m tests.support.serve_run run <config>`` is Ray Serve's own ``serve run`` CLI, after a
``ray.init`` like the one it makes itself (the address from RAY_ADDRESS, Serve's namespace; the
tests pass no runtime env) but with ``include_dashboard=False``: the CLI has no flag for it and
Ray reads no environment variable for it. ``serve run`` then finds Ray initialised and deploys
to it. No test reads that dashboard (``serve run`` talks to Serve's controller; ``serve deploy``
needs one, and its test starts a head of its own with ``ray start``). What it saves, per start of
the shipped config with 10 analyses (2026-12-08, 2 cores): the dashboard's 9 module processes and
its forkserver, 11 of 26 processes; with tests/conftest.py's Ray settings, Ray's own processes
(not the app's actors) 8.1-8.2 -> 4.8-5.1 CPU-s at load 2-5 (the whole tree 42.7-43.0 -> 39.6-40.5),
10.4-17.9 -> 6.1-7.7 at load 15-40; the start's wall did not change measurably.
The README's ``visionroute serve`` keeps Ray's defaults, dashboard included.
"""

from __future__ import annotations

import sys

import ray
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.scripts import cli

if __name__ == "__main__":
    ray.init(namespace=SERVE_NAMESPACE, include_dashboard=False)
    cli(sys.argv[1:], prog_name="serve")
