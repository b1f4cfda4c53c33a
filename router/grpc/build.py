"""Generate the gRPC Python code from ``router/grpc/proto/visionroute.proto`` with grpcio-tools.

The generated ``router/grpc/proto/visionroute_pb2*.py`` are build outputs (gitignored), never
edited by hand. ``ensure_generated()`` runs protoc when they are missing or older than the
.proto, so ``serve run``, the tests and ``visionroute grpc-build`` all get fresh code; it
writes to a temporary folder first and renames, so concurrent replicas never import a
half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from visionroute.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds router/
PROTO = PACKAGE_ROOT / "router" / "grpc" / "proto" / "visionroute.proto"
OUTPUTS = ("visionroute_pb2.py", "visionroute_pb2.pyi", "visionroute_pb2_grpc.py")


def is_fresh() -> bool:
    outputs = [PROTO.parent / name for name in OUTPUTS]
    return all(p.exists() and p.stat().st_mtime >= PROTO.stat().st_mtime for p in outputs)


def generate() -> list[Path]:
    """Run protoc (bundled with grpcio-tools); returns the files written."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ConfigError(
            "grpcio-tools is not installed; it generates the gRPC code (pip install grpcio-tools)",
            field="grpc",
        ) from None
    relative = PROTO.relative_to(PACKAGE_ROOT)
    with tempfile.TemporaryDirectory(dir=PROTO.parent, prefix=".gen-") as tmp:
        include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PACKAGE_ROOT}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(relative),
            ]
        )
        if code != 0:
            raise ConfigError(f"protoc failed on {PROTO} with exit code {code}", field="grpc")
        written = []
        for name in OUTPUTS:
            target = PROTO.parent / name
            os.replace(Path(tmp) / relative.parent / name, target)
            written.append(target)
    return written


def ensure_generated() -> None:
    if not is_fresh():
        generate()


def main() -> int:
    for path in generate():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
