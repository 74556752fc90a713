"""Regenerate the Python code for proto/ into sdk_python/cuepoint/v1.

Run `make protos`. With --check, generate into a temporary folder and exit 1
if the committed files differ, so CI catches a .proto edited without
regenerating (the drift check).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = ROOT / "sdk_python"
GENERATED = OUT_PACKAGE / "cuepoint" / "v1"


def generate(out_root: Path) -> Path:
    # Only our own package: proto/google/rpc ships for other languages' clients, and Python has it from
    # googleapis-common-protos.
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "cuepoint").rglob("*.proto"))
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        # The venv may not be activated, so name mypy-protobuf's plugins by path.
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    subprocess.run(cmd, check=True)
    out = out_root / "cuepoint" / "v1"
    (out / "__init__.py").write_text('"""Generated from proto/cuepoint/v1 by scripts/gen_protos.py. Do not edit."""\n')
    return out


def differences(a: Path, b: Path) -> list[str]:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    out = []
    for name in names:
        if name == "__pycache__":
            continue
        pa, pb = a / name, b / name
        if not pa.exists() or not pb.exists() or not filecmp.cmp(pa, pb, shallow=False):
            out.append(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            stale = differences(fresh, GENERATED) if GENERATED.exists() else ["(missing)"]
            if stale:
                print("generated protobuf code is stale; run `make protos`:", ", ".join(stale))
                return 1
            print("generated protobuf code is up to date")
            return 0
        if GENERATED.exists():
            shutil.rmtree(GENERATED)
        shutil.copytree(fresh, GENERATED)
    print(f"generated {GENERATED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
