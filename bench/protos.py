"""Python stubs for proto/fashion_mnist/v1/classifier.proto, generated with grpcio-tools at run time into a
scratch folder (never committed), plus MLServer's Open Inference Protocol messages, which MLServer ships."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO = "fashion_mnist/v1/classifier.proto"


def fmnist_stubs(out_dir: Path = REPO / "bench/results/tmp/stubs"):
    """Returns (classifier_pb2, classifier_pb2_grpc), generating them when missing or older than the proto."""
    from grpc_tools import protoc

    src = REPO / "proto" / PROTO
    generated = out_dir / PROTO.replace(".proto", "_pb2.py")
    if not generated.exists() or generated.stat().st_mtime < src.stat().st_mtime:
        out_dir.mkdir(parents=True, exist_ok=True)
        include = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(["protoc", f"-I{REPO / 'proto'}", f"-I{include}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}", str(src)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {src} (exit {rc})")
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    return (importlib.import_module("fashion_mnist.v1.classifier_pb2"),
            importlib.import_module("fashion_mnist.v1.classifier_pb2_grpc"))


def oip_messages():
    """MLServer's generated Open Inference Protocol (KServe v2) gRPC messages."""
    from mlserver.grpc import dataplane_pb2

    return dataplane_pb2
