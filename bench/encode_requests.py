"""Encodes the request bodies the load generator sends (examples/loadgen.rs): gRPC frames (1 flag byte, 4-byte
big-endian length, protobuf message), each written as a record (u32 little-endian length + frame).

For each model, from the committed test-set fixture (1,000 real Fashion-MNIST test images):
  fmnist-<model>-{raw,png,multi16,multi64}.bin   fashion_mnist.v1.ClassifyRequest (our server and the Python
                                                 peer)
  oip-<model>-{raw,png,multi16,multi64}.bin      inference.ModelInferRequest (Open Inference Protocol: the same bodies go
                                         to our server's GRPCInferenceService, MLServer and Triton)
  oip-<model>-png-batched.bin            the PNG bodies with shape [1, 1] instead of [1], for Triton (a batching
                                         Triton model's input needs dims: [batch, 1])
raw: one image as 784 raw bytes; png: one image as a PNG file; multi16 and multi64: 16 or 64 raw images per call.

    bench/.venv/bin/python bench/encode_requests.py --out bench/results/tmp/bodies --model cnn
"""

from __future__ import annotations

import argparse
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from protos import REPO, fmnist_stubs, oip_messages

MULTI = (16, 64)


def frame(message) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def write(path: Path, messages) -> int:
    with path.open("wb") as f:
        n = 0
        for m in messages:
            body = frame(m)
            f.write(struct.pack("<I", len(body)) + body)
            n += 1
    return n


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28), mode="L").save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", action="append", required=True, help="model name (repeatable)")
    ap.add_argument("--images", type=Path, default=REPO / "tests/fixtures/test-images.u8")
    a = ap.parse_args()

    images = np.frombuffer(a.images.read_bytes(), dtype=np.uint8).reshape(-1, 784)
    pngs = [png(img) for img in images]
    groups = {k: [images[i : i + k] for i in range(0, len(images) - k + 1, k)] for k in MULTI}
    pb, _ = fmnist_stubs()
    oip = oip_messages()
    a.out.mkdir(parents=True, exist_ok=True)

    for model in a.model:
        def ours(imgs):
            return pb.ClassifyRequest(images=imgs, model=model)

        write(a.out / f"fmnist-{model}-raw.bin", (ours([pb.Image(raw=img.tobytes())]) for img in images))
        write(a.out / f"fmnist-{model}-png.bin", (ours([pb.Image(encoded=p)]) for p in pngs))
        for k in MULTI:
            write(a.out / f"fmnist-{model}-multi{k}.bin",
                  (ours([pb.Image(raw=img.tobytes()) for img in g]) for g in groups[k]))

        def infer(datatype: str, shape: list[int], raw: bytes):
            # Our server's input names (README "Open Inference Protocol"); the MLServer runtime goes by datatype.
            name = {"UINT8": "raw", "BYTES": "encoded"}[datatype]
            tensor = oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
            return oip.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[raw])

        write(a.out / f"oip-{model}-raw.bin", (infer("UINT8", [1, 28, 28], img.tobytes()) for img in images))
        # BYTES elements in raw contents: each one prefixed by its u32 little-endian length (KServe v2 / Triton).
        write(a.out / f"oip-{model}-png.bin",
              (infer("BYTES", [1], struct.pack("<I", len(p)) + p) for p in pngs))
        # The same PNG bodies with the shape [1, 1]: a batching Triton model cannot declare a per-image input
        # of no dims, so its encoded input is [batch, 1] (dims [1], reshaped to [batch] for the model).
        write(a.out / f"oip-{model}-png-batched.bin",
              (infer("BYTES", [1, 1], struct.pack("<I", len(p)) + p) for p in pngs))
        for k in MULTI:
            write(a.out / f"oip-{model}-multi{k}.bin",
                  (infer("UINT8", [k, 28, 28], g.tobytes()) for g in groups[k]))
    print(f"request bodies for {', '.join(a.model)} ({len(images)} images) in {a.out}")


if __name__ == "__main__":
    main()
