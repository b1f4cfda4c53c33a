"""Benchmarks: each prints its figure next to a baseline measured in the same run.

``visionroute bench <name>`` runs them (visionroute/cli/bench.py):

- ``serve``: HTTP through Ray Serve vs raw ONNX Runtime (``serve.py``);
- ``calibration``: ECE before/after, validity over random splits, escalation needed (``calibration.py``);
- ``retrieval``: exact vs HNSW vs IVF-PQ+refine, embedding throughput, zero-shot (``retrieval.py``);
- ``vlm``: vLLM sequential vs concurrent, client overhead vs a bare ``openai`` call (``vlm.py``);
- ``audit``: coverage of the audit estimator's bounds over simulated runs (``audit.py``).

Each module imports its heavy dependencies itself, so the CLI imports none of them until a
benchmark runs.
"""
