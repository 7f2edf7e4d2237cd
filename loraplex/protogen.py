"""Generates the gRPC stubs from ``proto/`` into ``loraplex/proto/`` (run by ``make install``; never edit them)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# protoc names modules after the path it sees: proto/loraplex/v1/generate.proto is seen as
# loraplex/proto/v1/generate.proto, so every stub lands in the one package loraplex.proto.
VIRTUAL_ROOT = Path("loraplex/proto")
SOURCE_ROOT = PROTO_DIR / "loraplex"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every proto under ``out_dir``."""
    from grpc_tools import protoc  # a build-time dependency only

    files = [str(VIRTUAL_ROOT / p.relative_to(SOURCE_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{VIRTUAL_ROOT}={SOURCE_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ]
    if protoc.main([*args, *files]) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(files))
    return generated_files(out_dir)


def generated_files(root: Path) -> list[Path]:
    """The stub files that ``generate`` writes (or wrote) under ``root``."""
    out = []
    for proto in proto_files():
        stem = root / VIRTUAL_ROOT / proto.relative_to(SOURCE_ROOT).with_suffix("")
        out += [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return out


def main() -> int:
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
