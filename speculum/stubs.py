"""Generate the Python gRPC stubs (with .pyi) from protos/ into speculum/v1/.

The .proto files are the single source; `make` runs this whenever they change, and
tests/test_stubs.py regenerates into a temporary folder to catch stale stubs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from speculum.paths import REPO_ROOT

PROTO_ROOT = REPO_ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "speculum" / "v1").glob("*.proto"))


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) over every proto; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    package = out_dir / "speculum" / "v1"
    (package / "__init__.py").touch()
    return sorted(p for p in package.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))


if __name__ == "__main__":
    for path in generate():
        print(f"generated {path.relative_to(REPO_ROOT)}", file=sys.stderr)
