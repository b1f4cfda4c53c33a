"""Helpers only tests use: real-server warm-ups, the tiny vLLM model's version, free ports.

Nothing in the product packages imports from here; anything a CLI command needs stays there
(``examples.vllm_server`` starts the tiny vLLM server for ``visionroute vlm serve-tiny`` too).
"""
