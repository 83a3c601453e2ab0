"""Regenerates ``inference_pb2.py`` / ``inference_pb2_grpc.py`` from ``inference.proto`` (needs grpcio-tools).

The checked-in modules were generated with grpcio-tools 1.80 (protobuf 6.31 gencode), which runs on the protobuf 6
and 7 runtimes Ray and tritonclient install. Run: ``python -m slimray.serving.grpc.generate``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    code = protoc.main(["grpc_tools.protoc", f"-I{here}", f"--python_out={here}", f"--grpc_python_out={here}", str(here / "inference.proto")])
    if code == 0:
        # the generated modules name their messages' module as top-level ``inference_pb2``: make it the package's, so
        # Ray can pickle a request (Serve's gRPC proxy sends the message object to the replica) and the service module
        # imports its sibling package-relative
        msgs = here / "inference_pb2.py"
        msgs.write_text(msgs.read_text().replace("(DESCRIPTOR, 'inference_pb2', _globals)", f"(DESCRIPTOR, '{__package__}.inference_pb2', _globals)"))
        svc = here / "inference_pb2_grpc.py"
        svc.write_text(svc.read_text().replace("import inference_pb2 as inference__pb2", "from . import inference_pb2 as inference__pb2"))
    return code


if __name__ == "__main__":
    sys.exit(main())
