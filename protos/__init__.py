"""Protocol buffers of the serving API. Python stubs are generated from the .proto files by
grpcio-tools the first time this package is imported (and again whenever a .proto is newer)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("rayquant/v1/generation.proto", "grpc/health/v1/health.proto")


def _stale(proto: Path) -> bool:
    stubs = [proto.with_name(proto.stem + "_pb2.py"), proto.with_name(proto.stem + "_pb2_grpc.py")]
    return any(not s.exists() or s.stat().st_mtime < proto.stat().st_mtime for s in stubs)


def build_stubs() -> None:
    """Generate `*_pb2.py` / `*_pb2_grpc.py` next to each .proto (written to a temp dir, then moved)."""
    from grpc_tools import protoc

    for rel in PROTO_FILES:
        proto = _ROOT / rel
        if not _stale(proto):
            continue
        with tempfile.TemporaryDirectory(dir=_ROOT) as tmp:
            # Compile relative to the directory holding `protos/` so imports read `from protos.… import …`.
            code = protoc.main(["grpc_tools.protoc", f"-I{_ROOT.parent}", f"--python_out={tmp}",
                                f"--grpc_python_out={tmp}", str(proto)])
            if code != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            for stub in (Path(tmp) / "protos" / rel).parent.glob(proto.stem + "_pb2*.py"):
                os.replace(stub, proto.parent / stub.name)


build_stubs()
