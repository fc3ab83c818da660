"""Regenerate the committed protobuf/gRPC modules: ``python -m protos.codegen``."""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = ("protos/admin.proto", "protos/generation.proto", "protos/stage.proto",
          "protos/worker.proto")
ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) so that imports read ``from protos import ...``."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}", *[str(ROOT / p) for p in PROTOS]]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(ROOT)
    sys.exit(0)
