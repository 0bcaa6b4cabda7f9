"""Export a trained model to ONNX, check it against PyTorch, evaluate the ONNX file itself on the untouched
test set, and write the metadata the service loads, into one version folder of the repository
(models/<name>/<version>/model.onnx + model.json)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from data import CLASS_NAMES, load_split
from reference import reference_dir, write_reference
from models import Exported, count_macs, count_parameters

# One line per class, shown by the service's model-info RPC and the web page (the reference's "Infos").
CLASS_DESCRIPTIONS = [
    "Short- or long-sleeved casual top without buttons or collar.",
    "Long trousers or jeans, two legs visible.",
    "Knitted sweater or jumper pulled over the head, long sleeves.",
    "One-piece garment for the upper body and legs, often flared.",
    "Outer garment with long sleeves, usually buttoned or zipped, longer than a jacket.",
    "Open shoe with straps, toes and heel visible.",
    "Buttoned shirt with a collar, long or short sleeves.",
    "Low athletic shoe with laces and a rubber sole.",
    "Handbag, backpack or tote, with or without handles.",
    "Boot that covers the ankle, with or without a heel.",
]

# The reference models' published figures, carried into the metadata so every consumer compares like for like.
REFERENCE = {"dense": {"test_accuracy": 0.8822, "test_loss": 0.3254}, "cnn": {"test_accuracy": 0.9236, "test_loss": 0.2336}}

INPUT_SPEC = {
    "name": "image",
    "shape": ["batch", 1, 28, 28],
    "dtype": "float32",
    "range": [0.0, 1.0],
    "scaling": "pixel / 255",
    "polarity": "light garment on a dark (0) background, as in Fashion-MNIST",
}
OUTPUTS = [
    {"name": "probabilities", "shape": ["batch", 10], "dtype": "float32", "meaning": "softmax over the 10 classes"},
    {"name": "logits", "shape": ["batch", 10], "dtype": "float32", "meaning": "pre-softmax scores (for OOD scoring)"},
    {"name": "features", "shape": ["batch", "F"], "dtype": "float32", "meaning": "penultimate-layer activations"},
]
PARITY_TOLERANCE = 1e-4


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    wrapped = Exported(model).eval()
    torch.onnx.export(
        wrapped, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["probabilities", "logits", "features"],
        dynamic_axes={n: {0: "batch"} for n in ["image", "probabilities", "logits", "features"]},
    )
    onnx.checker.check_model(onnx.load(str(path)))


def load_onnx_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """The inverse of export_onnx: `model`'s weights from an exported file, so a later training stage can start
    from what the repository serves. The exporter folds each batch norm that follows a convolution into the
    convolution's weight and bias; such a batch norm comes back as the identity with the folded bias as its
    shift, the same function in eval mode (which is how the exposure stages run batch norm)."""
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    # ood/ nodes: the OOD components training/ood_protocol.py appends, not layers of the model.
    layers = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm", "BatchNormalization")
              and not n.name.startswith("ood/")]
    modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))]
    folded_bias = None
    with torch.no_grad():
        for m in modules:
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and folded_bias is not None:
                m.weight.fill_(1.0)
                m.bias.copy_(folded_bias)
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)  # (x - 0) / sqrt(var + eps) = x
                folded_bias = None
                continue
            node = layers.pop(0)
            params = [init[i] for i in node.input[1:] if i in init]
            if isinstance(m, nn.Conv2d):
                assert node.op_type == "Conv", (m, node.op_type)
                m.weight.copy_(params[0])
                if m.bias is not None:
                    m.bias.copy_(params[1])
                else:
                    folded_bias = params[1]
            elif isinstance(m, nn.Linear):
                assert node.op_type in ("MatMul", "Gemm"), (m, node.op_type)
                m.weight.copy_(params[0].T if node.op_type == "MatMul" else params[0])
                if m.bias is not None:
                    m.bias.copy_(params[1])
            else:
                assert node.op_type == "BatchNormalization", (m, node.op_type)
                for t, v in zip([m.weight, m.bias, m.running_mean, m.running_var], params):
                    t.copy_(v)
    assert not layers and folded_bias is None, "the model and the file have the same layers"
    return model.eval()


def onnx_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, x: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
    outs = {"probabilities": [], "logits": [], "features": []}
    for i in range(0, len(x), batch):
        res = sess.run(list(outs), {"image": x[i : i + batch]})
        for k, v in zip(outs, res):
            outs[k].append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def check_parity(model: torch.nn.Module, sess: ort.InferenceSession, x: np.ndarray) -> float:
    """Max absolute difference of probabilities and logits between PyTorch and ONNX Runtime."""
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(x))
        probs = torch.softmax(logits, 1)
    got = run_onnx(sess, x)
    diff = max(np.abs(got["probabilities"] - probs.numpy()).max(), np.abs(got["logits"] - logits.numpy()).max())
    if diff > PARITY_TOLERANCE:
        raise AssertionError(f"ONNX output differs from PyTorch by {diff:.2e} > {PARITY_TOLERANCE}")
    return float(diff)


def evaluate_onnx(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> dict:
    logits = run_onnx(sess, x)["logits"].astype(np.float64)
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    pred = logits.argmax(1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    return {
        "test_accuracy": float((pred == y).mean()),
        "test_loss": float(-log_probs[np.arange(len(y)), y].mean()),
        "test_images": int(len(y)),
        "per_class_accuracy": {CLASS_NAMES[c]: float(confusion[c, c] / confusion[c].sum()) for c in range(10)},
        "confusion_matrix": confusion.tolist(),
    }


def plot_confusion(confusion: list[list[int]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array(confusion)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(10), CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(10):
        for j in range(10):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_and_evaluate(model, *, cfg: dict, history: list[dict], best: dict, train_seconds: float,
                        x_val: torch.Tensor, out_dir: Path, data_dir: Path) -> dict:
    name = cfg["model"]
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, onnx_path)
    sess = onnx_session(onnx_path)

    test_images, test_labels = load_split("test", data_dir)  # the one and only read of the test set
    x_test = (test_images.astype(np.float32) / 255.0)[:, None]
    parity = check_parity(model, sess, x_test[:1000])
    metrics = evaluate_onnx(sess, x_test, test_labels)
    plot_confusion(metrics["confusion_matrix"], out_dir / "confusion.png",
                   f"{name}: ONNX test accuracy {metrics['test_accuracy'] * 100:.2f}%")

    digest = sha256(onnx_path)
    today = dt.date.today().isoformat()
    meta = {
        "name": name,
        "version": f"{today}.{digest[:8]}",
        "file": onnx_path.name,
        "sha256": digest,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": [{"id": i, "name": n, "description": d} for i, (n, d) in enumerate(zip(CLASS_NAMES, CLASS_DESCRIPTIONS))],
        "input": INPUT_SPEC,
        "outputs": OUTPUTS,
        "parameters": count_parameters(model),
        "macs_per_image": count_macs(model),
        "metrics": metrics,
        "validation": {"best_epoch": best["epoch"], "val_loss": best["val_loss"], "val_acc": best["val_acc"],
                       "val_images": int(len(x_val))},
        "reference": REFERENCE[name],
        "onnx_parity_max_abs_diff": parity,
        "training": {"config": cfg, "history": history, "seconds": round(train_seconds, 1),
                     "cpu": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__, "opset": 17},
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_reference(onnx_path, name, reference_dir(out_dir))
    print(f"{name}: ONNX test accuracy {metrics['test_accuracy'] * 100:.2f}% loss {metrics['test_loss']:.4f} "
          f"(reference {REFERENCE[name]['test_accuracy'] * 100:.2f}% / {REFERENCE[name]['test_loss']:.4f}); "
          f"parity {parity:.1e}; {meta['parameters']} params, {meta['macs_per_image'] / 1e6:.1f}M MACs/image "
          f"-> {onnx_path}", flush=True)
    return meta
