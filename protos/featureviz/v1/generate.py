"""Regenerate the Python code of ``featureviz.proto``: ``python -m featureviz.v1.generate`` (``make proto``).

The include root is the ``protos/`` folder, so generated imports read ``from featureviz.v1 import
featureviz_pb2``, which resolves through the package mapping of ``pyproject.toml``. Needs ``grpcio-tools``
(the ``test`` extra); nothing imports this module at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["PROTO_ROOT", "PROTO_FILE", "GENERATED", "generate"]

PROTO_ROOT = Path(__file__).resolve().parents[2]  # protos/
PROTO_FILE = "featureviz/v1/featureviz.proto"
GENERATED = ("featureviz_pb2.py", "featureviz_pb2_grpc.py", "featureviz_pb2.pyi")


def generate(out_dir: str | Path | None = None) -> list[Path]:
    """Run protoc on featureviz.proto; write into ``out_dir`` (default: beside the .proto, in place).

    Returns the paths of the generated files.
    """
    import grpc_tools
    from grpc_tools import protoc

    out_root = Path(out_dir) if out_dir is not None else PROTO_ROOT
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    rc = protoc.main(argv)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc} on {PROTO_ROOT / PROTO_FILE}")
    return [out_root / "featureviz" / "v1" / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m featureviz.v1.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output root (default: protos/, i.e. in place)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
