"""Generate llmgw/_proto/*_pb2*.py from proto/*.proto with grpc_tools.protoc (run by setup.py, `make protos`)."""

import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(HERE, "proto")
PROTO_OUT = os.path.join(HERE, "llmgw", "_proto")


def generate_protos() -> None:
    """Run grpc_tools.protoc on every proto/*.proto into llmgw/_proto (package-relative imports)."""
    import grpc_tools  # build requirement ([build-system] in pyproject.toml)
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "*.proto")))
    if not protos:
        return
    os.makedirs(PROTO_OUT, exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={PROTO_OUT}",
        f"--pyi_out={PROTO_OUT}",
        f"--grpc_python_out={PROTO_OUT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(protos))
    # protoc emits top-level imports ("import gossip_pb2"); make them package-relative.
    for path in glob.glob(os.path.join(PROTO_OUT, "*_pb2*.py")):
        with open(path) as f:
            src = f.read()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", src, flags=re.M)
        if fixed != src:
            with open(path, "w") as f:
                f.write(fixed)


if __name__ == "__main__":
    generate_protos()
    sys.exit(0)
