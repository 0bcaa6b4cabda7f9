"""A model that costs ONNX Runtime next to nothing, for measuring the service's own work per call (issue #34).

Same contract as `models/cnn/1`: input `image` float32 [batch, 1, 28, 28], output `logits` float32 [batch, 10],
the energy detector and accept rule copied from the real model's metadata. The graph only reshapes the input and
slices its first ten pixels, so a batch's ORT run is a few microseconds: the server CPU per call measured with
it is the serving work (HTTP/2, protobuf, the codec, admission, the batcher's hand-offs, spans, metrics) and
nothing else. Its answers are meaningless; only their cost is measured.

Run with the training venv (it has `onnx`); the output is committed, so `make bench` needs no `onnx`:

    .venv-train/bin/python bench/noop_model.py --out bench/noop-models
"""
import argparse
import hashlib
import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent


def graph() -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    consts = [
        helper.make_tensor("flat_shape", TensorProto.INT64, [2], [0, 784]),
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [10]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["logits"]),
    ]
    g = helper.make_graph(nodes, "noop", [image], [logits], initializer=consts)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench/noop_model.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=REPO / "models/cnn/1", help="real version whose metadata is copied")
    ap.add_argument("--out", type=Path, default=REPO / "bench/noop-models")
    a = ap.parse_args()
    version = a.out / "cnn" / "1"
    if version.exists():
        shutil.rmtree(version)
    version.mkdir(parents=True)
    data = graph().SerializeToString()
    (version / "model.onnx").write_bytes(data)
    meta = json.loads((a.source / "model.json").read_text())
    digest = hashlib.sha256(data).hexdigest()
    keep = ("name", "classes", "input", "calibration", "accept", "ood")
    meta = {k: meta[k] for k in keep if k in meta}
    meta.update({
        "version": f"noop.{digest[:8]}", "file": "model.onnx", "sha256": digest, "parameters": 0, "macs_per_image": 0,
        "metrics": {"test_accuracy": 0.0, "test_loss": 0.0, "test_images": 0},  # not measured: answers are meaningless
        "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32",
                     "meaning": "the first ten pixels: a graph ORT runs in microseconds, for measuring the service"}],
        "purpose": "bench only (bench/noop_model.py): same contract as models/cnn/1, no useful answers",
    })
    (version / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    if (a.source / "ood.json").exists():
        shutil.copy(a.source / "ood.json", version / "ood.json")
    print(f"{version}: {len(data)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
