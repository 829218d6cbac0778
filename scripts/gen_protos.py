"""Generate the Python gRPC code for protos/kvmesh/v1/*.proto into kvmesh/v1/.

    python scripts/gen_protos.py           # regenerate kvmesh/v1/*_pb2*.py{,i}
    python scripts/gen_protos.py --check   # exit 1 if the committed generated code is stale

Protos are compiled with `-I protos`, so `kvmesh/v1/common.proto` becomes `kvmesh/v1/common_pb2.py` and
generated imports read `from kvmesh.v1 import common_pb2`, which resolves into our own package.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path("kvmesh") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files() -> list[Path]:
    """The .proto files, relative to PROTO_ROOT, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Runs protoc on every proto; the generated files land under out_dir/kvmesh/v1/."""
    # NOTE: the well-known types (google/protobuf/*.proto) ship inside grpc_tools, not on the system.
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_ROOT / p) for p in proto_files()),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generated_files(root: Path) -> set[Path]:
    """Generated files under root/kvmesh/v1, relative to root."""
    pkg = root / PACKAGE_DIR
    return {p.relative_to(root) for p in pkg.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def stale_files() -> list[Path]:
    """Generated files that differ from a fresh generation, are missing, or have no proto any more."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = generated_files(fresh_root)
        committed = generated_files(REPO_ROOT)
        stale = {
            p
            for p in fresh
            if p not in committed or not filecmp.cmp(fresh_root / p, REPO_ROOT / p, shallow=False)
        }
        stale |= committed - fresh
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with a fresh generation; exit 1 if stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated protobuf code (run python scripts/gen_protos.py):", file=sys.stderr)
            for path in stale:
                print(f"  {path}", file=sys.stderr)
            return 1
        print("generated protobuf code is up to date")
        return 0
    (REPO_ROOT / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    for path in generated_files(REPO_ROOT):
        (REPO_ROOT / path).unlink()  # so a deleted proto leaves no orphan module behind
    generate(REPO_ROOT)
    for path in sorted(generated_files(REPO_ROOT)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
