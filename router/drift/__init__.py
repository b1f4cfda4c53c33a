"""Drift in one room: has a task's live traffic moved since its thresholds were certified?

- ``monitors``: the statistics and their two-sample tests (confidence, inputs, embeddings,
  reviewers' verdicts), each false-alarming at most ``level`` per window;
- ``service``: ``DriftService``, which feeds them from live traffic in one ingress replica
  (a worker thread; the request never waits) and exports them on /metrics;
- ``config``: the ``drift:`` section of the app config.

The faces and tools that use them live with their kind: ``GET /v1/drift`` is router/http/drift.py,
``visionroute drift report`` visionroute/cli/drift.py, ``visionroute bench drift``
evals/benchmarks/drift.py. Nothing is re-exported here, so importing the config stays light.
"""
