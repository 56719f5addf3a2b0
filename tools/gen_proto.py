#!/usr/bin/env python3
"""Generate service/proto/kvtier_pb2.py, its type stub kvtier_pb2.pyi (what mypy reads) and kvtier_pb2_grpc.py
from service/proto/kvtier.proto.

The source folder service/ is installed as ``kvtier.service``, so protoc must see the file at
``kvtier/service/proto/kvtier.proto`` for the generated code to import ``kvtier.service.proto``:
the proto is copied into that layout in a temporary folder, compiled there, and the three files
copied back. The output depends on the grpcio-tools version (its ``GRPC_GENERATED_VERSION`` line),
which requirements.lock pins.

Usage: ``python tools/gen_proto.py`` (write) or ``--check`` (exit 1 if the files are stale).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "service" / "proto"
NAMES = ("kvtier_pb2.py", "kvtier_pb2.pyi", "kvtier_pb2_grpc.py")


def generate(out_dir: Path) -> dict[str, str]:
    """Compile the proto into ``out_dir`` (a scratch folder); return {file name: generated text}."""
    rel = Path("kvtier/service/proto/kvtier.proto")
    (out_dir / rel.parent).mkdir(parents=True, exist_ok=True)
    shutil.copy(PROTO_DIR / "kvtier.proto", out_dir / rel)
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.", str(rel)],
        cwd=out_dir,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"protoc failed: {out.stderr.strip()}")
    return {name: (out_dir / rel.parent / name).read_text() for name in NAMES}


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    stale = [n for n in NAMES if not (PROTO_DIR / n).exists() or (PROTO_DIR / n).read_text() != fresh[n]]
    if "--check" in argv:
        for n in stale:
            print(f"service/proto/{n} is stale: run python tools/gen_proto.py")
        return 1 if stale else 0
    for n in NAMES:
        (PROTO_DIR / n).write_text(fresh[n])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
