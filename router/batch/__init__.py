"""Bulk analysis on Ray Data: ``visionroute batch run`` (docs/batch.md).

A third face over the same service core as HTTP and gRPC: every item goes through
``AnalyzeService.analyze`` (router/services/analyze/), built from the same serve config inside
each Ray Data actor, so the cascade, policy set, certificate, budgets, review enqueue and privacy
are the service's own.

- inputs.py: a folder or a manifest (CSV, JSONL, Parquet) -> ``BatchItem`` rows; a bad row
  carries its own error, a bad manifest is a ``ConfigError`` naming it;
- gather.py: the cheap tier batched across the concurrent analyses of one actor;
- worker.py: ``BatchAnalyzer``, the Ray Data actor (one service per actor);
- output.py: the Parquet and JSONL results, and which items a rerun skips;
- job.py: ``run_batch``: connect, skip what is done, map_batches, write, summarise.
"""
