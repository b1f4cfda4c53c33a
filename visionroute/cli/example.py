"""``visionroute example digits``: build, certify and serve a worked example (examples/)."""

from __future__ import annotations


def register(subparsers, bench) -> None:
    example = subparsers.add_parser("example", help="build, certify and serve a worked example")
    examples = example.add_subparsers(dest="example", required=True, metavar="EXAMPLE")
    digits_example = examples.add_parser(
        "digits",
        help="the three-tier digits cascade (cheap ONNX -> trained VLM on vLLM -> review), certified",
        description="Prepare digits_cheap, train or reuse the digits LLaVA and start its vLLM server, "
        "calibrate both tiers, certify the cheap and VLM accept thresholds and the review threshold, "
        "write serve_config.digits.yaml's copy with the artefacts and serve it (docs/vlm.md).",
    )
    from examples.digits import add_arguments as add_example_digits_arguments

    add_example_digits_arguments(digits_example)
