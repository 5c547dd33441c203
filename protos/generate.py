"""Regenerate the gRPC Python code from the .proto files: `python protos/generate.py`.

protoc writes `import tensor_pb2`; the imports are rewritten to `splitllm.protos` so the generated
modules live inside the package. Needs grpcio-tools 1.76 (the last line whose protobuf is 6.x, as
qai-hub requires protobuf<=6.31.1).
"""

import re
import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def main() -> int:
    protos = sorted(p.name for p in HERE.glob("*.proto"))
    args = ["protoc", f"-I{HERE}", f"--python_out={HERE}", f"--pyi_out={HERE}", f"--grpc_python_out={HERE}"]
    if protoc.main(args + protos) != 0:
        return 1
    for path in sorted(HERE.glob("*_pb2*.py*")):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from splitllm.protos import \1 as", text, flags=re.M)
        fixed = re.sub(r"^import (\w+_pb2)$", r"from splitllm.protos import \1", fixed, flags=re.M)
        path.write_text(fixed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
