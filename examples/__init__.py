"""Worked examples and their helpers, outside the product packages.

- ``digits``: the three-tier digits cascade (cheap ONNX -> the digits LLaVA on vLLM -> review),
  built, certified and served by ``visionroute example digits``;
- ``train_digits``, ``tiny_llava``: the two small LLaVA models the examples, the VLM tests and
  the benchmarks serve (each also runs as a script in the vLLM venv);
- ``llava_training``: the two-stage training loop ``train_digits`` and ``textures_vlm`` share;
- ``vllm_server``: starts a real vLLM server for them (``visionroute vlm serve-tiny``).

They build on the product packages only; evals/ benchmarks and the command line use them
(tests/test_import_graph.py holds that order).
"""
