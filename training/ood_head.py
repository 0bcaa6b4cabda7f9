"""Is it a garment at all? A small head on the frozen CNN's features from several layers, trained and judged in
minutes without retraining the CNN (issue #30). The protocol, fixed before the first measurement, is
training/ood_head_protocol.md; this script carries it out.

    .venv-train/bin/python training/ood_head.py extract --model cnn        # features, once, cached (resumable)
    .venv-train/bin/python training/ood_head.py extract --model cnn-int8
    .venv-train/bin/python training/ood_head.py logo --method multi-mlp    # leave-one-group-out, resumable
    .venv-train/bin/python training/ood_head.py report                     # training/results/ood-head*.{json,md}
    .venv-train/bin/python training/ood_head.py export --method multi-mlp  # build/models-head/<model>/1/
    .venv-train/bin/python training/ood_head.py bench                      # throughput with and without the head

Features: one ONNX graph per model computes, beside its own outputs, `head_input` [batch, 939]: per channel the
mean, standard deviation and maximum over the spatial positions of each conv block's last ReLU (block 1:
32 channels at 28x28, block 2: 64 at 14x14, block 3: 128 at 7x7; in cnn-int8 the dequantized tensors the next
layer reads), the penultimate features (256), the logits (10) and the energy (1). The same nodes go into the
deployed graph (export), so what the head was trained on is what the server computes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import CLASS_NAMES, DEFAULT_DATA_DIR, load_split  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build/ood-head"
FEATURES = BUILD / "features"
RUNS = BUILD / "runs"
RESULTS = REPO / "training/results"
VAL_SIZE, SPLIT_SEED = 5000, 42  # the CNN's own validation split (train.py's defaults, models/cnn model.json)
VAL_BUDGET = 0.0075  # round 2's: 0.75% of validation garments rejected, a margin under the 1% test target
SEEDS = (42, 43, 44)
TARGET = 0.95

# Taps: each conv block's last ReLU, by its name in the FP32 export; in cnn-int8 the same tensor's
# DequantizeLinear output (what the next layer reads) when the graph has one.
TAPS = {"block1": ("/model/body/body.1/body.1.5/Relu_output_0", 32),
        "block2": ("/model/body/body.2/body.2.5/Relu_output_0", 64),
        "block3": ("/model/body/body.3/body.3.2/Relu_output_0", 128)}
STATS = ("mean", "std", "max")


def sections() -> dict[str, slice]:
    """Column ranges of head_input."""
    out, at = {}, 0
    for block, (_, c) in TAPS.items():
        for s in STATS:
            out[f"{block}.{s}"] = slice(at, at + c)
            at += c
    for name, width in (("features", 256), ("logits", 10), ("energy", 1),
                        # Amendment 7: the input itself, pooled to 7x7 cells of 4x4 pixels: each cell's mean, and its
                        # mean absolute difference to the right and downward neighbour (2 x 49).
                        ("pixels.mean", 49), ("pixels.edges", 98)):
        out[name] = slice(at, at + width)
        at += width
    return out


SECTIONS = sections()
WIDTH = max(s.stop for s in SECTIONS.values())
PIXEL_SECTIONS = ["pixels.mean", "pixels.edges"]
# Rounds 3-6's head_input: every method declared before amendment 7 reads only these columns.
CNN_SECTIONS = [s for s in SECTIONS if s not in PIXEL_SECTIONS]
MEAN_MAX = [s for s in CNN_SECTIONS if not s.endswith(".std")]

# Evaluation groups (leave-one-group-out). Round 2's seven in build/ood, the new kinds in build/ood-head
# (training/ood_head_data.py).
ROUND2_GROUPS = ["photos", "digits", "noise", "shapes", "text", "silhouettes", "patterns"]
NEW_GROUPS = ["animals", "food", "plants", "vehicles", "tools", "household", "computer", "people", "symbols",
              "recreation", "places", "misc", "clip-shapes", "clip-patterns", "icons-apps", "icons-glyphs",
              "icons-files"]
GROUPS = ROUND2_GROUPS + NEW_GROUPS
# A fold leaves out a group and its kin: a kind that another group also covers is never trained on while that
# group is measured (the silhouettes group draws animals, vehicles and tools; clip-art shapes and patterns are
# the round-2 shapes' and patterns' kinds). Clip-art shapes and patterns are measured in those folds.
FOLD_LINKS = {"shapes": ["clip-shapes"], "patterns": ["clip-patterns"],
              "silhouettes": ["animals", "vehicles", "tools"],
              "animals": ["silhouettes"], "vehicles": ["silhouettes"], "tools": ["silhouettes"]}
MEASURED_IN = {"clip-shapes": "shapes", "clip-patterns": "patterns"}
FOLDS = [g for g in GROUPS if g not in MEASURED_IN]
# Always trained on, never measured: round 1's exposure and round 2's shape variety.
EXPOSURE = {"faces": "build/ood-exposure", "scenes": "build/ood-exposure", "fields": "build/ood-exposure",
            "scribbles": "build/ood-exposure", "creatures": "build/ood-shapes"}
HELD_OUT = {"masks": "build/ood-held-out"}


def group_file(g: str) -> Path:
    if g in ROUND2_GROUPS:
        return REPO / "build/ood" / f"{g}.u8"
    if g in EXPOSURE:
        return REPO / EXPOSURE[g] / f"{g}.u8"
    if g in HELD_OUT:
        return REPO / HELD_OUT[g] / f"{g}.u8"
    return BUILD / f"{g}.u8"


def fold_left_out(fold: str) -> list[str]:
    return [fold] + FOLD_LINKS.get(fold, [])


def fold_measured(fold: str) -> list[str]:
    return [fold] + [g for g, f in MEASURED_IN.items() if f == fold]


# Methods: (columns of head_input, kind, hidden units).
METHODS = {
    "energy": (["energy"], "identity", 0),
    "penult-mlp": (["features"], "mlp", 64),
    "multi-linear": (CNN_SECTIONS, "mlp", 0),
    "multi-mlp": (CNN_SECTIONS, "mlp", 64),
    # Amendment 1 (protocol): without the standard deviations, which cost the graph 18-34% throughput.
    "multi-mlp-ms": (MEAN_MAX, "mlp", 64),
    "stats-maha": ([f"{b}.{s}" for b in TAPS for s in STATS], "maha", 0),
    # Amendment 3 (protocol): multi-mlp-ms whose garments also include photographed training garments.
    "multi-mlp-ms-photos": (MEAN_MAX, "mlp", 64),
    # Amendment 4 (protocol): multi-mlp-ms refitted with each garment class weighted by how often pass 1
    # rejected it on the training garments.
    "multi-mlp-ms-balanced": (MEAN_MAX, "mlp", 64),
    # Amendment 5 (protocol): amendments 3 and 4 together.
    "multi-mlp-ms-photos-balanced": (MEAN_MAX, "mlp", 64),
    # Amendment 6 (protocol): amendment 5 with the class weights capped at 2 instead of 4.
    "multi-mlp-ms-photos-balanced2": (MEAN_MAX, "mlp", 64),
    # Amendment 7 (protocol): amendment 6 with the input's 7x7 pooled pixels and edges beside the CNN's statistics.
    "multi-mlp-ms-pixels-photos-balanced2": (MEAN_MAX + PIXEL_SECTIONS, "mlp", 64),
    # Amendment 8 (protocol): amendment 6 with photographed clip-art and exposure outliers on the outlier side.
    "multi-mlp-ms-photos-balanced2-outphotos": (MEAN_MAX, "mlp", 64),
}
# Methods whose garment side also holds product photos of training-split garments, converted by the service.
PHOTO_METHODS = {"multi-mlp-ms-photos", "multi-mlp-ms-photos-balanced", "multi-mlp-ms-photos-balanced2",
                 "multi-mlp-ms-pixels-photos-balanced2", "multi-mlp-ms-photos-balanced2-outphotos"}
# Methods whose outlier side also holds product photos of the trained-on outlier groups (amendment 8), one
# `photo-<g>` set per group g, left out with g.
OUTLIER_PHOTO_METHODS = {"multi-mlp-ms-photos-balanced2-outphotos"}
BALANCE_MAX = 4.0  # amendment 4: no garment class weighs more than 4 times another
# Methods refitted with class weights, and the most a class may weigh: amendment 4's cap, or 2 (amendments 6, 7).
BALANCED_METHODS = {"multi-mlp-ms-balanced": BALANCE_MAX, "multi-mlp-ms-photos-balanced": BALANCE_MAX,
                    "multi-mlp-ms-photos-balanced2": 2.0, "multi-mlp-ms-pixels-photos-balanced2": 2.0,
                    "multi-mlp-ms-photos-balanced2-outphotos": 2.0}
TRAIN_PHOTOS = REPO / "build/product-photos/train/mixed.u8"
# Amendment 8: the groups photographed for the outlier side. Never round 2's (build/ood): the non-garment product
# photos that measure the head are made from those.
PHOTO_OUTLIER_GROUPS = NEW_GROUPS + list(EXPOSURE)
OUTLIER_PHOTOS = REPO / "build/product-photos/outliers"
EPOCHS, BATCH, LR, WEIGHT_DECAY = 6, 1024, 2e-3, 1e-4


def columns(method: str) -> np.ndarray:
    return np.concatenate([np.arange(WIDTH)[SECTIONS[s]] for s in METHODS[method][0]])


# ---------------------------------------------------------------------------------------------- the graph


def model_path(model: str) -> Path:
    """The newest version of `model` without a garment head: the graph a head is fitted on and added to. A
    version this script exported (ood.method garment_head) is never a source, so a second export does not
    stack a head on a head."""
    versions = sorted((int(d.name), d) for d in (REPO / "models" / model).iterdir() if d.name.isdigit())
    for _, d in reversed(versions):
        # A version without model.json is one being written (export writes its graph first): not a source.
        if not (d / "model.json").exists():
            continue
        if json.loads((d / "model.json").read_text()).get("ood", {}).get("method") != "garment_head":
            return d / "model.onnx"
    raise SystemExit(f"models/{model} has no version without a garment head")


def add_head_input(model_proto, prefix: str = "head/", wanted: list[str] | None = None,
                   mean_scale: dict[str, float] | None = None) -> str:
    """Appends the nodes that compute head_input [batch, WIDTH] from the graph's own tensors (or, with `wanted`,
    only those sections, in that order: the deployed graph); returns its name. The extraction graph computes
    every section with ReduceMean/ReduceMax; a deployed graph without standard deviations takes the means and
    maxima from GlobalAveragePool/GlobalMaxPool, the same values at a fraction of the cost (Amendment 1)."""
    from onnx import helper

    g = model_proto.graph
    produced = {o for n in g.node for o in n.output}
    nodes = []
    wanted = wanted or list(SECTIONS)
    pooled = not any(w.endswith(".std") for w in wanted) and wanted != list(SECTIONS)

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [prefix + out], name=prefix + out, **kw))
        return prefix + out

    made, made4 = {}, {}
    qnodes = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear"}

    def scale_init(name: str, value: float) -> str:
        from onnx import numpy_helper

        g.initializer.append(numpy_helper.from_array(np.array(value, np.float32), prefix + name))
        return prefix + name

    mean_scale = mean_scale or {}
    if pooled and qnodes and any(b not in mean_scale for b in TAPS):
        raise ValueError("a quantized graph's pooled statistics need mean_scale per block")
    for block, (tensor, _) in TAPS.items():
        if not any(w.startswith(block + ".") for w in wanted):
            continue
        t = tensor + "_DequantizeLinear_Output" if tensor + "_DequantizeLinear_Output" in produced else tensor
        if t not in produced:
            raise SystemExit(f"{t} not in the graph: the CNN's layer names changed, update TAPS")
        quant = qnodes.get(tensor + "_QuantizeLinear_Output")
        if pooled and quant is not None:
            # cnn-int8 (Amendment 2): the statistics from the uint8 tensor, which ONNX Runtime keeps in NHWC: the
            # maximum by a full-size MaxPool (exact: dequantizing is monotonic), the mean by the com.microsoft
            # QLinearGlobalAveragePool with a finer output scale (mean_scale[block]); only [batch, C, 1, 1]
            # tensors are transposed and dequantized, never the full-resolution ones.
            q, scale, zero = quant.output[0], quant.input[1], quant.input[2]
            side = {"block1": 28, "block2": 14, "block3": 7}[block]
            fine = scale_init(f"{block}.mean_scale", mean_scale[block])
            nodes.append(helper.make_node("QLinearGlobalAveragePool", [q, scale, zero, fine, zero],
                                          [prefix + f"{block}.meanq"], name=prefix + f"{block}.meanq",
                                          domain="com.microsoft", channels_last=0))
            made4[f"{block}.mean"] = node("DequantizeLinear", [prefix + f"{block}.meanq", fine, zero], f"{block}.meandq")
            maxq = node("MaxPool", [q], f"{block}.maxq", kernel_shape=[side, side])
            made4[f"{block}.max"] = node("DequantizeLinear", [maxq, scale, zero], f"{block}.maxdq")
            continue
        if pooled:
            made4[f"{block}.mean"] = node("GlobalAveragePool", [t], f"{block}.gap")
            made4[f"{block}.max"] = node("GlobalMaxPool", [t], f"{block}.gmp")
            continue
        made[f"{block}.mean"] = node("ReduceMean", [t], f"{block}.mean", axes=[2, 3], keepdims=0)
        mean4 = node("ReduceMean", [t], f"{block}.mean4", axes=[2, 3], keepdims=1)
        diff = node("Sub", [t, mean4], f"{block}.diff")
        sq = node("Mul", [diff, diff], f"{block}.sq")
        var = node("ReduceMean", [sq], f"{block}.var", axes=[2, 3], keepdims=0)
        made[f"{block}.std"] = node("Sqrt", [var], f"{block}.std")
        made[f"{block}.max"] = node("ReduceMax", [t], f"{block}.max", axes=[2, 3], keepdims=0)
    if made4:  # [batch, C, 1, 1] each: one Concat and one Flatten (fewer nodes: batch-1 latency)
        stats = [w for w in wanted if w in made4]
        if stats != wanted[: len(stats)]:
            raise ValueError("the pooled statistics must come first in the method's columns")
        flat = node("Flatten", [node("Concat", [made4[w] for w in stats], "stats4", axis=1)], "stats")
        made |= {w: None for w in stats}
        made[stats[0]] = flat
    made["features"], made["logits"] = "features", "logits"
    if any(w in wanted for w in PIXEL_SECTIONS):
        # Amendment 7: 4x4 cells of the input ("image" [batch, 1, 28, 28], scaled 0..1). A 2x2 convolution
        # with the bottom and right edge padded takes each pixel's difference to its right and lower neighbour.
        from onnx import numpy_helper

        image = g.input[0].name
        made["pixels.mean"] = node("Flatten", [node("AveragePool", [image], "pixels.pool", kernel_shape=[4, 4],
                                                    strides=[4, 4])], "pixels.mean")
        step = np.zeros((2, 1, 2, 2), np.float32)
        step[0, 0, 0] = [-1, 1]  # right neighbour minus pixel
        step[1, 0, :, 0] = [-1, 1]  # lower neighbour minus pixel
        g.initializer.append(numpy_helper.from_array(step, prefix + "pixels.step"))
        diff = node("Conv", [image, prefix + "pixels.step"], "pixels.diff", kernel_shape=[2, 2], pads=[0, 0, 1, 1])
        pooled_edges = node("AveragePool", [node("Abs", [diff], "pixels.absdiff")], "pixels.edgepool",
                            kernel_shape=[4, 4], strides=[4, 4])
        made["pixels.edges"] = node("Flatten", [pooled_edges], "pixels.edges")
    if "energy" in wanted:
        made["energy"] = node("Neg", [node("ReduceLogSumExp", ["logits"], "lse", axes=[1], keepdims=1)], "energy")
    parts = [made[w] for w in wanted if made[w] is not None]
    out = parts[0] if len(parts) == 1 else node("Concat", parts, "head_input", axis=1)
    g.node.extend(nodes)
    return out


def stats_session(model: str, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.load(str(model_path(model)))
    name = add_head_input(m)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", WIDTH]))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]), name


# ------------------------------------------------------------------------------------------- extraction


def sources() -> dict[str, tuple[np.ndarray | Path, str]]:
    """Every set whose features are cached: name -> (uint8 images [N,784] or a .u8 file, digest)."""
    from train import split_train_val

    train_x, train_y = load_split("train", DEFAULT_DATA_DIR)
    test_x, _ = load_split("test", DEFAULT_DATA_DIR)
    tr, va = split_train_val(train_x, train_y, VAL_SIZE, SPLIT_SEED)
    out = {"train": train_x[tr].reshape(-1, 784), "val": train_x[va].reshape(-1, 784), "test": test_x.reshape(-1, 784)}
    for g in list(GROUPS) + list(EXPOSURE) + list(HELD_OUT):
        out[g] = group_file(g)
    if TRAIN_PHOTOS.exists():  # `product_photos.py make --split train` and examples/preprocess (amendment 3)
        out["train-photos"] = TRAIN_PHOTOS
    for g in PHOTO_OUTLIER_GROUPS:  # `product_photos.py make --split outliers` and examples/preprocess (amendment 8)
        if (OUTLIER_PHOTOS / f"{g}.u8").exists():
            out[f"photo-{g}"] = OUTLIER_PHOTOS / f"{g}.u8"
    return out


def load_images(src) -> np.ndarray:
    if isinstance(src, Path):
        return np.frombuffer(src.read_bytes(), np.uint8).reshape(-1, 784)
    return src


def digest(images: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes()).hexdigest()


def extract(model: str, threads: int) -> None:
    out_dir = FEATURES / model
    out_dir.mkdir(parents=True, exist_ok=True)
    sess, name = stats_session(model, threads)
    onnx_sha = hashlib.sha256(model_path(model).read_bytes()).hexdigest()
    for set_name, src in sources().items():
        if isinstance(src, Path) and not src.exists():
            raise SystemExit(f"{src} missing: run `make ood-sets` and training/ood_head_data.py")
        images = load_images(src)
        key = f"{onnx_sha}:{digest(images)}"
        path = out_dir / f"{set_name}.npz"
        if path.exists() and str(np.load(path)["key"]) == key:
            continue
        t0 = time.time()
        x = images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
        feats = np.concatenate([sess.run([name], {"image": x[i : i + 500]})[0] for i in range(0, len(x), 500)])
        np.savez(path.with_suffix(".tmp.npz"), x=feats.astype(np.float32), key=key)
        os.replace(path.with_suffix(".tmp.npz"), path)  # a stopped run never leaves half a file
        print(f"{model} {set_name}: {len(feats)} x {feats.shape[1]} in {time.time() - t0:.1f}s", flush=True)


def load_features(model: str) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p)["x"] for p in sorted((FEATURES / model).glob("*.npz"))}


# --------------------------------------------------------------------------------------------- the heads


class Head:
    """A fitted score on head_input columns: higher = less like a garment."""

    def __init__(self, method: str):
        self.method = method
        self.cols = columns(method)
        self.params: dict[str, np.ndarray] = {}

    def score(self, x: np.ndarray) -> np.ndarray:
        kind = METHODS[self.method][1]
        z = x[:, self.cols].astype(np.float64)
        if kind == "identity":
            return z[:, 0]
        p = self.params
        if kind == "maha":
            total = np.zeros(len(z))
            for b in TAPS:
                d = np.sqrt((((z[:, p[f"{b}.cols"]] - p[f"{b}.mean"]) @ p[f"{b}.whiten"].T) ** 2).sum(1))
                total += (d - p[f"{b}.dmean"]) / p[f"{b}.dstd"]
            return total
        h = (z - p["mu"]) / p["sd"]
        if "w1" in p:
            h = np.maximum(h @ p["w1"].T + p["b1"], 0)
        return (h @ p["w2"].T + p["b2"])[:, 0]

    def n_params(self) -> int:
        return int(sum(v.size for k, v in self.params.items() if not k.endswith(".cols")))


def fit_maha(head: Head, garments: np.ndarray) -> None:
    z = garments[:, head.cols].astype(np.float64)
    at = 0
    for b, (_, c) in TAPS.items():
        cols = np.arange(at, at + 3 * c)
        at += 3 * c
        x = z[:, cols]
        mean = x.mean(0)
        cov = np.cov(x - mean, rowvar=False)
        cov += np.eye(len(cov)) * 1e-3 * np.trace(cov) / len(cov)
        val, vec = np.linalg.eigh(cov)
        whiten = (vec / np.sqrt(val)).T
        d = np.sqrt((((x - mean) @ whiten.T) ** 2).sum(1))
        head.params.update({f"{b}.cols": cols, f"{b}.mean": mean, f"{b}.whiten": whiten,
                            f"{b}.dmean": np.array(d.mean()), f"{b}.dstd": np.array(d.std())})


def fit_mlp(head: Head, garments: np.ndarray, outliers: dict[str, np.ndarray], seed: int, threads: int,
            garment_weights: np.ndarray | None = None) -> None:
    """Weighted logistic loss, garments against outliers. Garments weigh as much as all outliers together; each
    outlier group's share is proportional to the square root of its size (a 60-image group is not drowned by a
    6,000-image one, nor copied a hundred times). `garment_weights` (one per garment row) shares the garments'
    weight out unevenly; by default every garment weighs the same."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    hidden = METHODS[head.method][2]
    xin = garments[:, head.cols]
    mu, sd = xin.mean(0), np.maximum(xin.std(0), 1e-3)
    names = sorted(outliers)
    xs = [xin] + [outliers[g][:, head.cols] for g in names]
    x = torch.from_numpy(((np.concatenate(xs) - mu) / sd).astype(np.float32))
    y = torch.from_numpy(np.r_[np.zeros(len(xin)), np.ones(len(x) - len(xin))].astype(np.float32))
    shares = np.array([np.sqrt(len(outliers[g])) for g in names])
    shares = shares / shares.sum()
    gw = np.full(len(xin), 1.0) if garment_weights is None else garment_weights * len(xin) / garment_weights.sum()
    w = np.concatenate([gw] + [np.full(len(outliers[g]), s * len(xin) / len(outliers[g]))
                                                    for g, s in zip(names, shares)])
    w = torch.from_numpy((w / w.mean()).astype(np.float32))
    d = x.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)) if hidden \
        else torch.nn.Sequential(torch.nn.Linear(d, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    for _ in range(EPOCHS):
        perm = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            loss = (loss_fn(net(x[idx])[:, 0], y[idx]) * w[idx]).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    head.params = {"mu": mu.astype(np.float64), "sd": sd.astype(np.float64)}
    if hidden:
        head.params |= {"w1": layers[0].weight.detach().double().numpy(), "b1": layers[0].bias.detach().double().numpy()}
    head.params |= {"w2": layers[-1].weight.detach().double().numpy(), "b2": layers[-1].bias.detach().double().numpy()}


def fit(method: str, feats: dict[str, np.ndarray], left_out: list[str], seed: int, threads: int) -> Head:
    head = Head(method)
    kind = METHODS[method][1]
    if kind == "maha":
        fit_maha(head, feats["train"])
    elif kind == "mlp":
        outliers = {g: feats[g] for g in list(GROUPS) + list(EXPOSURE) if g not in left_out}
        garments = feats["train"]
        if method in PHOTO_METHODS:
            if "train-photos" not in feats:
                raise SystemExit(f"{method} needs {TRAIN_PHOTOS}: product_photos.py make --split train, then "
                                 "examples/preprocess, then extract")
            garments = np.concatenate([garments, feats["train-photos"]])
        if method in OUTLIER_PHOTO_METHODS:
            missing = [g for g in PHOTO_OUTLIER_GROUPS if f"photo-{g}" not in feats]
            if missing:
                raise SystemExit(f"{method} needs {OUTLIER_PHOTOS}/<group>.u8 for {missing}: product_photos.py make "
                                 "--split outliers, then examples/preprocess per group, then extract")
            outliers |= {f"photo-{g}": feats[f"photo-{g}"] for g in PHOTO_OUTLIER_GROUPS if g not in left_out}
        fit_mlp(head, garments, outliers, seed, threads)
        if method in BALANCED_METHODS:
            labels = train_labels()
            if method in PHOTO_METHODS:
                labels = np.concatenate([labels, train_photo_labels()])
            weights = class_balance(head.score(garments), labels, BALANCED_METHODS[method])
            fit_mlp(head, garments, outliers, seed, threads, garment_weights=weights)
    return head


@functools.cache
def train_labels() -> np.ndarray:
    """The class of each training garment, in the order of the cached "train" features."""
    from train import split_train_val

    train_x, train_y = load_split("train", DEFAULT_DATA_DIR)
    tr, _ = split_train_val(train_x, train_y, VAL_SIZE, SPLIT_SEED)
    return np.asarray(train_y)[tr]


def train_photo_labels() -> np.ndarray:
    """The class of each photographed training garment, in the order of TRAIN_PHOTOS (its manifest's rows)."""
    rows = [line.rstrip("\n").split("\t") for line in (TRAIN_PHOTOS.parent / "manifest.tsv").read_text().splitlines()[1:]]
    return np.array([int(r[1]) for r in rows if r[2] == TRAIN_PHOTOS.stem])


def class_balance(scores: np.ndarray, labels: np.ndarray, cap: float = BALANCE_MAX) -> np.ndarray:
    """Amendment 4: each garment's weight, clip(r_c / mean(r), 1, cap), where r_c is the share of class c's
    training garments scored above the training garments' own (1 - VAL_BUDGET) quantile."""
    t = float(np.quantile(scores, 1 - VAL_BUDGET))
    rejected = np.array([(scores[labels == c] > t).mean() for c in range(10)])
    per_class = np.clip(rejected / max(rejected.mean(), 1e-12), 1.0, cap)
    print("  balance: " + " ".join(f"{CLASS_NAMES[c]} {rejected[c] * 100:.2f}%x{per_class[c]:.2f}" for c in range(10)),
          flush=True)
    return per_class[labels]


def threshold(s_val: np.ndarray) -> float:
    return float(np.quantile(s_val, 1 - VAL_BUDGET))


# Amendments 9 and 10: a threshold per class the CNN predicts, raised for a class that would otherwise lose more
# than CLASS_CAP of its validation garments ("capped"), and with the common threshold then lowered until VAL_BUDGET
# of the validation garments are rejected again ("capped_budget"). Amendment 10's cap: three quarters of the
# issue's 2%, the margin round 2's budget keeps under its 1% target.
CLASS_CAP = 0.015
CLASS_RULES = ("capped", "capped_budget")


def class_thresholds(s_val: np.ndarray, c_val: np.ndarray, rule: str, cap: float = CLASS_CAP
                     ) -> tuple[float, np.ndarray]:
    """The common threshold and each predicted class's under `rule`, from the validation garments' scores and
    predicted classes. A class's threshold is never under the common one."""
    single = threshold(s_val)
    # A class no validation garment is predicted as has no evidence for a threshold of its own: the common one.
    q_cap = np.array([float(np.quantile(s_val[c_val == c], 1 - cap)) if (c_val == c).any() else -np.inf
                      for c in range(10)])
    if rule == "capped":
        return single, np.maximum(single, q_cap)
    if rule != "capped_budget":
        raise ValueError(f"unknown class rule {rule}")
    # The lowest validation score t' at which no more garments are over max(t', q_cap[c]) than over the single
    # threshold (its share, 0.76% of the 5,000 where the budget is 0.75%: the quantile falls between two scores):
    # the share falls as t' rises, so a binary search over the sorted scores.
    budget = float((s_val > single).mean())
    cap_of = q_cap[c_val]
    order = np.sort(s_val)
    lo, hi = 0, len(order) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if (s_val > np.maximum(order[mid], cap_of)).mean() <= budget:
            hi = mid
        else:
            lo = mid + 1
    common = float(order[lo])
    return common, np.maximum(common, q_cap)


def measure(head: Head, feats: dict[str, np.ndarray], groups: list[str]) -> dict:
    s_val = head.score(feats["val"])
    t = threshold(s_val)
    return {"threshold": t, "val_rejected": float((s_val > t).mean()),
            "test_rejected": float((head.score(feats["test"]) > t).mean()),
            "groups": {g: float((head.score(feats[g]) > t).mean()) for g in groups}}


# ------------------------------------------------------------------------------------ leave one group out


def run_path(method: str, fold: str, seed: int) -> Path:
    return RUNS / method / f"{fold}-s{seed}.npz"


def logo(method: str, threads: int) -> None:
    """Every fold x seed, and the shipped fit (fold 'all': no group left out) per seed. Each run's head and
    figures are saved as it finishes; a rerun skips what is there."""
    fp32, int8 = load_features("cnn"), load_features("cnn-int8")
    deterministic = METHODS[method][1] != "mlp"
    t_all = time.time()
    fits = 0
    for seed in SEEDS:
        for fold in FOLDS + ["all"]:
            path = run_path(method, fold, seed)
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            left_out = fold_left_out(fold) if fold != "all" else []
            measured = fold_measured(fold) if fold != "all" else GROUPS + list(HELD_OUT)
            src = run_path(method, fold, SEEDS[0])
            t0 = time.time()
            if deterministic and seed != SEEDS[0] and src.exists():
                head = load_head(src)  # energy and the Gaussian fit have no seed: the same head for each
            else:
                head = fit(method, fp32, left_out, seed, threads)
                fits += 1
            fit_s = time.time() - t0
            record = {"method": method, "fold": fold, "seed": seed, "left_out": left_out, "fit_seconds": fit_s,
                      "cnn": measure(head, fp32, measured), "cnn-int8": measure(head, int8, measured),
                      "cnn-int8_fp32_threshold": None, "params": head.n_params()}
            t32 = record["cnn"]["threshold"]
            record["cnn-int8_fp32_threshold"] = {g: float((head.score(int8[g]) > t32).mean()) for g in measured}
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, record=json.dumps(record), **{f"p.{k}": v for k, v in head.params.items()})
            os.replace(tmp, path)
            worst = min(record["cnn"]["groups"].items(), key=lambda kv: kv[1])
            print(f"{method} seed {seed} fold {fold:13s} fit {fit_s:5.1f}s  "
                  + " ".join(f"{g} {v * 100:5.1f}" for g, v in record["cnn"]["groups"].items())
                  + f"  test {record['cnn']['test_rejected'] * 100:.2f}%", flush=True)
    wall = time.time() - t_all
    print(f"{method}: {fits} fits, {wall:.0f}s", flush=True)
    if fits:
        timing = BUILD / "timings.json"
        times = json.loads(timing.read_text()) if timing.exists() else {}
        times.setdefault(method, []).append({"fits": fits, "wall_seconds": wall, "threads": threads,
                                             "date": time.strftime("%Y-%m-%d %H:%M")})
        timing.write_text(json.dumps(times, indent=1) + "\n")


def load_head(path: Path) -> Head:
    z = np.load(path)
    rec = json.loads(str(z["record"]))
    head = Head(rec["method"])
    head.params = {k[2:]: z[k] for k in z.files if k.startswith("p.")}
    return head


def load_record(method: str, fold: str, seed: int) -> dict:
    return json.loads(str(np.load(run_path(method, fold, seed))["record"]))


# ------------------------------------------------------------------------------------------------ report


def summarise(method: str) -> dict | None:
    if not all(run_path(method, f, s).exists() for f in FOLDS + ["all"] for s in SEEDS):
        return None
    recs = {(f, s): load_record(method, f, s) for f in FOLDS + ["all"] for s in SEEDS}
    out = {"method": method, "columns": METHODS[method][0] if len(METHODS[method][0]) < 5 else "all 939",
           "kind": METHODS[method][1], "hidden": METHODS[method][2], "params": recs[("all", SEEDS[0])]["params"]}
    for model in ("cnn", "cnn-int8"):
        per_group = {}
        for fold in FOLDS:
            for g in fold_measured(fold):
                per_group[g] = {str(s): recs[(fold, s)][model]["groups"][g] for s in SEEDS}
        rows = {g: {"seeds": v, "mean": float(np.mean(list(v.values()))), "min": float(min(v.values()))}
                for g, v in per_group.items()}
        worst = min(rows, key=lambda g: rows[g]["mean"])
        worst_by_seed = {str(s): min((per_group[g][str(s)], g) for g in per_group) for s in SEEDS}
        worst_seed = min(worst_by_seed, key=lambda s: worst_by_seed[s][0])
        test = [recs[(f, s)][model]["test_rejected"] for f in FOLDS for s in SEEDS]
        val = [recs[(f, s)][model]["val_rejected"] for f in FOLDS for s in SEEDS]
        shipped = recs[("all", SEEDS[0])][model]
        out[model] = {
            "groups": rows, "worst_group": worst, "worst_rejected": rows[worst]["mean"],
            "mean_rejected": float(np.mean([r["mean"] for r in rows.values()])),
            "round2_mean_rejected": float(np.mean([rows[g]["mean"] for g in ROUND2_GROUPS])),
            "worst_seed": {"seed": int(worst_seed), "group": worst_by_seed[worst_seed][1],
                           "rejected": worst_by_seed[worst_seed][0]},
            "test_rejected_max_over_folds": float(max(test)), "test_rejected_mean_over_folds": float(np.mean(test)),
            "val_rejected_mean": float(np.mean(val)),
            "shipped_fit": {"seed": SEEDS[0], "threshold": shipped["threshold"], "val_rejected": shipped["val_rejected"],
                            "test_rejected": shipped["test_rejected"],
                            "held_out": {g: shipped["groups"][g] for g in HELD_OUT},
                            "test_rejected_by_seed": {str(s): recs[("all", s)][model]["test_rejected"] for s in SEEDS}},
        }
    out["int8_parity"] = {g: out["cnn-int8"]["groups"][g]["mean"] - out["cnn"]["groups"][g]["mean"]
                          for g in out["cnn"]["groups"]}
    out["int8_parity_max_abs"] = float(max(abs(v) for v in out["int8_parity"].values()))
    if not any(c.endswith(".std") for c in METHODS[method][0]) and any(c.startswith("block") for c in METHODS[method][0]):
        deployed = int8_deployed_rows(method)
        out["int8_deployed_graph"] = {"groups": deployed, "parity": {
            g: deployed[g] - out["cnn"]["groups"][g]["mean"] for g in deployed}}
        out["int8_deployed_graph"]["parity_max_abs"] = float(max(abs(v) for v in out["int8_deployed_graph"]["parity"].values()))
    out["int8_fp32_threshold_parity_max_abs"] = float(max(
        abs(np.mean([recs[(f, s)]["cnn-int8_fp32_threshold"][g] for s in SEEDS]) - out["cnn"]["groups"][g]["mean"])
        for f in FOLDS for g in fold_measured(f)))
    out["fit_seconds"] = {"total": float(sum(r["fit_seconds"] for r in recs.values())),
                          "per_fit_mean": float(np.mean([r["fit_seconds"] for r in recs.values()]))}
    return out


def report() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = {}
    for method in METHODS:
        s = summarise(method)
        if s is None:
            print(f"{method}: not complete, left out of the report")
            continue
        done[method] = s
        timing = BUILD / "timings.json"
        if timing.exists():
            s["timings"] = json.loads(timing.read_text()).get(method)
        (RESULTS / f"ood-head-{method}.json").write_text(json.dumps(s, indent=1) + "\n")
    (RESULTS / "ood-head.md").write_text(markdown(done))
    print((RESULTS / "ood-head.md").read_text())


def markdown(done: dict) -> str:
    pct = lambda v: f"{v * 100:.1f}"  # noqa: E731
    lines = ["# Garment head: leave-one-group-out (issue #30)", "",
             "Protocol: training/ood_head_protocol.md. Rejected share of each left-out group (%), threshold at "
             f"{VAL_BUDGET * 100:g}% of the 5,000 validation garments, head fitted without the group and its kin "
             f"(FOLD_LINKS); mean over seeds {', '.join(map(str, SEEDS))}. Made by training/ood_head.py report.", "",
             "## Summary", "",
             "| method | params | worst group (mean of seeds) | worst seed's worst | mean of groups | round-2 groups mean "
             "| test garments rejected: shipped fit (max over folds) | INT8: worst group, max abs diff per group |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    for m, s in done.items():
        c, q = s["cnn"], s["cnn-int8"]
        lines.append(f"| {m} | {s['params']:,} | {pct(c['worst_rejected'])} ({c['worst_group']}) | "
                     f"{pct(c['worst_seed']['rejected'])} ({c['worst_seed']['group']}, seed {c['worst_seed']['seed']}) | "
                     f"{pct(c['mean_rejected'])} | {pct(c['round2_mean_rejected'])} | "
                     f"{c['shipped_fit']['test_rejected'] * 100:.2f} ({c['test_rejected_max_over_folds'] * 100:.2f}) | "
                     f"{pct(q['worst_rejected'])} ({q['worst_group']}), {s['int8_parity_max_abs'] * 100:.1f} points |")
    for m, s in done.items():
        if "int8_deployed_graph" in s:
            d = s["int8_deployed_graph"]
            worst = min(d["groups"], key=d["groups"].get)
            lines += ["", f"{m} on cnn-int8 as its deployed graph computes the block means (Amendment 2: rounded in "
                      f"uint8): worst group {pct(d['groups'][worst])} ({worst}), per group within "
                      f"{d['parity_max_abs'] * 100:.1f} points of cnn."]
    lines += ["", "## Per group, cnn (seeds; mean) and cnn-int8 (mean, same heads, its own validation threshold)", ""]
    methods = list(done)
    lines.append("| group | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---:|" * len(methods))
    for g in GROUPS:
        cells = []
        for m in methods:
            r, q = done[m]["cnn"]["groups"][g], done[m]["cnn-int8"]["groups"][g]
            cell = f"{pct(r['mean'])} ({'/'.join(pct(v) for v in r['seeds'].values())}; int8 {pct(q['mean'])})"
            cells.append(f"**{cell}**" if g == done[m]["cnn"]["worst_group"] else cell)
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    timing = BUILD / "timings.json"
    if timing.exists():
        times = json.loads(timing.read_text())
        lines += ["", "## Time", "", "One method's whole leave-one-group-out run (22 folds x 3 seeds + 3 shipped fits; "
                  "energy and stats-maha fit once per fold), 1 thread, niced, on the shared 2-core machine "
                  "while others built Rust: " + "; ".join(
                      f"{m}: {t[-1]['wall_seconds'] / 60:.1f} min ({t[-1]['fits']} fits, {t[-1]['date']})"
                      for m, t in times.items() if m in done) + "."]
    tp = RESULTS / "ood-head-throughput.json"
    if tp.exists():
        lines += ["", "## Throughput of the exported graph", "",
                  "ONNX Runtime, 1 thread, best of interleaved repeats (training/ood_head.py bench): images/s without -> "
                  "with the head, and the cost.", "", "| head | model | batch 1 | batch 64 |", "|---|---|---:|---:|"]
        for fit, res in json.loads(tp.read_text()).items():
            for model in ("cnn", "cnn-int8"):
                cells = [f"{r['base_images_per_s']:.0f} -> {r['head_images_per_s']:.0f} ({r['cost'] * 100:+.1f}%)"
                         for r in (res[f"{model}/batch1"], res[f"{model}/batch64"])]
                lines.append(f"| {fit} | {model} | " + " | ".join(cells) + " |")
            cpu = res['machine']['cpu'].split(':', 1)[-1].strip()
            lines.append(f"| | machine | {cpu} | {res['machine']['date']} |")
    lines += ["", "Held-out (build/ood-held-out, measured once with each method's shipped fit: seed "
              f"{SEEDS[0]}, every group): "
              + "; ".join(f"{m}: " + ", ".join(f"{g} {pct(v)}%" for g, v in s["cnn"]["shipped_fit"]["held_out"].items())
                          for m, s in done.items()) + ".", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ export


def next_version_dir(out_root: Path, model: str, source_version: int) -> Path:
    """Where an export of a head fitted on `source_version` goes: the version after every one under `out_root`
    (and after the source), so a head exported before (version 2 from version 1) stays for rollback and no
    version is ever written over."""
    root = out_root / model
    taken = [int(d.name) for d in root.iterdir() if d.name.isdigit()] if root.is_dir() else []
    return root / str(max(taken + [source_version]) + 1)


def export(method: str, out_root: Path, seed: int, class_rule: str | None = None) -> None:
    """The shipped fit (every group, `seed`) appended to each model's graph as output `ood_components`
    [batch, 1] (the garment head's score, higher = less like a garment), and an ood.json that names it.

    With `class_rule` (amendment 10), the output is the head's score less an offset for the class the CNN
    predicts, so that the one threshold in ood.json acts as that class's own: what the rule gives each class
    from this graph's own validation scores, less the common threshold."""
    import shutil

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    head = load_head(run_path(method, "all", seed))
    kind = METHODS[method][1]
    if kind != "mlp":
        raise SystemExit(f"export writes MLP/linear heads; {method} is {kind}")
    p = head.params
    for model in ("cnn", "cnn-int8"):
        src = model_path(model)
        m = onnx.load(str(src))
        g = m.graph
        feats = load_features(model)
        # The finest output scale that holds every block mean seen in the cached sets with a 2x margin (uint8,
        # zero point 0 after the ReLU): the mean is then rounded to 1/255 of twice its largest value.
        mean_scale = int8_mean_scale(feats)
        hin = add_head_input(m, wanted=METHODS[method][0], mean_scale=mean_scale)
        if any(n.domain == "com.microsoft" for n in m.graph.node) and not any(
                op.domain == "com.microsoft" for op in m.opset_import):
            m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        # Standardisation folded into the first layer: (x - mu) / sd @ W^T + b = x @ (W / sd)^T + (b - W @ (mu / sd)).
        first = "w1" if "w1" in p else "w2"
        bias = "b1" if "w1" in p else "b2"
        w = p[first] / p["sd"]
        b = p[bias] - w @ p["mu"]
        init = lambda name, a: g.initializer.append(numpy_helper.from_array(np.asarray(a), "head/" + name))  # noqa: E731
        nodes = []
        node = lambda op, ins, out, **kw: nodes.append(helper.make_node(op, ins, [out], name=out, **kw))  # noqa: E731
        x = hin  # the method's sections in its column order: no Gather
        init("w_a", w.T.astype(np.float32))
        init("b_a", b.astype(np.float32))
        node("MatMul", [x, "head/w_a"], "head/za")
        if "w1" in p:
            node("Add", ["head/za", "head/b_a"], "head/ha")
            node("Relu", ["head/ha"], "head/h")
            init("w_b", p["w2"].T.astype(np.float32))
            init("b_b", p["b2"].astype(np.float32))
            node("MatMul", ["head/h", "head/w_b"], "head/zb")
            node("Add", ["head/zb", "head/b_b"], "ood_components")
        else:
            node("Add", ["head/za", "head/b_a"], "ood_components")
        g.node.extend(nodes)
        g.output.append(helper.make_tensor_value_info("ood_components", TensorProto.FLOAT, ["batch", 1]))
        onnx.checker.check_model(m)
        dst = next_version_dir(out_root, model, int(src.parent.name))
        dst.mkdir(parents=True)
        onnx.save(m, str(dst / "model.onnx"))
        # Threshold from this model's own validation garments at the budget (thresholds come from validation only),
        # from the exported graph's own scores: what the server will compute.
        offsets, common = None, None
        if class_rule:
            val = sources()["val"]
            s_val, c_val = graph_scores(graph_session(dst / "model.onnx"), val)
            common, per_class = class_thresholds(s_val, c_val, class_rule)
            offsets = (per_class - common).astype(np.float32)
            # ood_components = head score - offsets[argmax(logits)]: three nodes on a [batch, 1] tensor.
            last = next(n for n in g.node if list(n.output) == ["ood_components"])
            last.output[0], last.name = "head/score", "head/score"
            g.initializer.append(numpy_helper.from_array(offsets.reshape(10, 1), "head/class_offsets"))
            g.node.extend([
                helper.make_node("ArgMax", ["logits"], ["head/class"], name="head/class", axis=1, keepdims=0),
                helper.make_node("Gather", ["head/class_offsets", "head/class"], ["head/class_offset"],
                                 name="head/class_offset", axis=0),
                helper.make_node("Sub", ["head/score", "head/class_offset"], ["ood_components"],
                                 name="ood_components")])
            onnx.checker.check_model(m)
            onnx.save(m, str(dst / "model.onnx"))
            # The offsets must land on the class the same runtime predicts: the final graph against the head-only
            # graph's scores less the offset of their argmax, on the same images.
            shifted, _ = graph_scores(graph_session(dst / "model.onnx"), val)
            worst = float(np.abs(shifted - (s_val - offsets[c_val])).max())
            if worst > 1e-4:
                raise SystemExit(f"{model}: the class offsets in the graph differ from the head less its class's "
                                 f"offset by up to {worst}")
        rec, parity = deployed_measure(dst / "model.onnx", head, model, common, offsets)
        ood = {"method": "garment_head", "threshold": rec["threshold"], "components": ["garment_head"],
               "graph_output": {"name": "ood_components", "components": ["garment_head"]},
               "description": f"garment head: a small network ({method}) on the CNN's block means and maxima"
                              + (" and the input's 7x7 pooled pixels and edges"
                                 if any(s in PIXEL_SECTIONS for s in METHODS[method][0]) else "")
                              + ", fitted against clip-art, icon and procedural outliers"
                              + (" and product photos of them" if method in OUTLIER_PHOTO_METHODS else "")
                              + (", with product photos of training garments beside the dataset's"
                                 if method in PHOTO_METHODS else "")
                              + (", with a threshold per predicted class that lets no class the CNN predicts lose more "
                                 f"than {CLASS_CAP:.1%} of the validation garments it is predicted for"
                                 if class_rule else "")
                              + " (training/ood_head.py)",
               "protocol": "training/ood_head_protocol.md",
               "test_rejected_per_class": rec["test_rejected_per_class"],
               **({"class_thresholds": {
                   "rule": class_rule, "cap": CLASS_CAP, "protocol_amendment": 10,
                   "meaning": "the score is the head's less the offset of the class the CNN predicts, so that "
                              "`threshold` acts as each class's own (`threshold` + offset)",
                   "offsets": dict(zip(CLASS_NAMES, offsets.astype(float).tolist()))}} if class_rule else {}),
               "head": {"protocol": "training/ood_head_protocol.md", "fit": method, "seed": seed,
                        "class_rule": class_rule,
                        "val_budget": VAL_BUDGET, "val_rejected": rec["val_rejected"],
                        "test_rejected": rec["test_rejected"], "groups_rejected_in_sample": rec["groups"],
                        "graph_vs_cached_features": parity,
                        "source_model_sha256": hashlib.sha256(src.read_bytes()).hexdigest()}}
        (dst / "ood.json").write_text(json.dumps(ood, indent=1) + "\n")
        for extra in ("model.json",):
            shutil.copy(src.parent / extra, dst / extra)
        meta = json.loads((dst / "model.json").read_text())
        meta["sha256"] = hashlib.sha256((dst / "model.onnx").read_bytes()).hexdigest()
        meta["version"] = f"{meta['version'].split('.')[0]}.{meta['sha256'][:8]}"  # export.py's build id: date.sha
        meta["outputs"] = [o for o in meta["outputs"] if o["name"] != "ood_components"] + [{
            "name": "ood_components", "shape": ["batch", 1], "dtype": "float32",
            "meaning": "garment head score (training/ood_head.py), higher = less like a garment"
                       + (", less the offset of the class the CNN predicts (ood.json class_thresholds)"
                          if class_rule else "")}]
        meta["ood"] = {"method": "garment_head", "threshold": rec["threshold"], "file": "ood.json",
                       "sha256": hashlib.sha256((dst / "ood.json").read_bytes()).hexdigest()}
        # The accept rule again, as training/ood_protocol.py makes it, with this head's validation OOD mask: the
        # lowest calibrated confidence at which accepted validation answers are >= the target right.
        meta["accept"] = rec["accept"] | {"target_val_accuracy": meta["accept"]["target_val_accuracy"]}
        meta["versions"] = meta.get("versions", {}) | {"source": src.parent.name}
        (dst / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        per_class = ", ".join(f"{c} {v * 100:.1f}%" for c, v in rec["test_rejected_per_class"].items())
        print(f"{model}: {dst}, threshold {rec['threshold']:.4f}, val {rec['val_rejected'] * 100:.2f}%, "
              f"test {rec['test_rejected'] * 100:.2f}%, accept {meta['accept']}, graph vs cached features: {parity}")
        print(f"{model}: test garments rejected as OOD per class: {per_class}")


def graph_session(onnx_path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def graph_scores(sess, src) -> tuple[np.ndarray, np.ndarray]:
    """An exported graph's `ood_components` and predicted class (argmax of its logits) for one of `sources()`."""
    x = load_images(src).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    runs = [sess.run(["ood_components", "logits"], {"image": x[i : i + 500]}) for i in range(0, len(x), 500)]
    return (np.concatenate([r[0][:, 0] for r in runs]).astype(np.float64),
            np.concatenate([r[1].argmax(1) for r in runs]))


def deployed_measure(onnx_path: Path, head: Head, model: str, common: float | None = None,
                     offsets: np.ndarray | None = None) -> tuple[dict, dict]:
    """The exported graph run on validation, test and every group: the rejected shares at its own validation
    threshold (or at `common`, for a graph with class `offsets`), and how far they and the scores are from the
    head on the cached features (the graph's scores with their class's offset added back)."""
    sess = graph_session(onnx_path)
    src = sources()  # the dataset read once, not once per set
    feats = load_features(model)
    names = ["val", "test"] + GROUPS + list(HELD_OUT)
    graph, cached, unshifted = {}, {}, {}
    for name in names:
        graph[name], classes = graph_scores(sess, src[name])
        unshifted[name] = graph[name] + (offsets[classes] if offsets is not None else 0.0)
        cached[name] = head.score(feats[name])
    t, tc = (threshold(graph["val"]) if common is None else common), threshold(cached["val"])
    rec = {"threshold": t, "val_rejected": float((graph["val"] > t).mean()),
           "test_rejected": float((graph["test"] > t).mean()),
           "groups": {g: float((graph[g] > t).mean()) for g in GROUPS + list(HELD_OUT)}}
    rec |= accept_and_per_class(sess, src, graph, t, model)
    # Parity with the single threshold on both sides, as before offsets existed: what the graph computes of the
    # head itself.
    tu = threshold(unshifted["val"])
    diff = {g: float((unshifted[g] > tu).mean()) - float((cached[g] > tc).mean()) for g in GROUPS + list(HELD_OUT)}
    parity = {"score_max_abs_diff": float(max(np.abs(unshifted[n] - cached[n]).max() for n in names)),
              "threshold_graph": tu, "threshold_cached_features": tc,
              "rejected_max_abs_diff_points": float(max(abs(v) for v in diff.values()) * 100),
              "test_rejected_cached_features": float((cached["test"] > tc).mean())}
    return rec, parity


def accept_and_per_class(sess, src, graph: dict, t: float, model: str) -> dict:
    """The accept rule with this head's OOD mask (validation only; test reported), and the test garments each
    class loses to the head."""
    from ood_protocol import ACCEPT_TARGET, accept_threshold, accepted_stats
    from train import split_train_val

    # The head leaves the logits as they were: the source version's temperature still calibrates them.
    temperature = json.loads((model_path(model).parent / "model.json").read_text())["calibration"]["temperature"]
    train_x, train_y = load_split("train", DEFAULT_DATA_DIR)
    _, test_y = load_split("test", DEFAULT_DATA_DIR)
    _, va = split_train_val(train_x, train_y, VAL_SIZE, SPLIT_SEED)
    labels = {"val": train_y[va], "test": test_y}
    conf, correct = {}, {}
    for name in ("val", "test"):
        x = load_images(src[name]).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
        logits = np.concatenate([sess.run(["logits"], {"image": x[i : i + 500]})[0] for i in range(0, len(x), 500)])
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        conf[name], correct[name] = p.max(1), p.argmax(1) == labels[name]
    ood = {name: graph[name] > t for name in ("val", "test")}
    min_conf = accept_threshold(conf["val"], correct["val"], ood["val"], ACCEPT_TARGET)
    val, test = (accepted_stats(conf[n], correct[n], ood[n], min_conf) for n in ("val", "test"))
    accept = {"min_confidence": min_conf, "val_accuracy": val["accuracy"], "val_coverage": val["coverage"],
              "test_accuracy": test["accuracy"], "test_coverage": test["coverage"]}
    per_class = {CLASS_NAMES[c]: float(ood["test"][labels["test"] == c].mean()) for c in range(10)}
    return {"accept": accept, "test_rejected_per_class": per_class}


def int8_mean_scale(feats: dict[str, np.ndarray]) -> dict[str, float]:
    """The output scale of cnn-int8's pooled block means (Amendment 2)."""
    return {b: float(2 * max(f[:, SECTIONS[f"{b}.mean"]].max() for f in feats.values()) / 255) for b in TAPS}


def as_deployed_int8(x: np.ndarray, mean_scale: dict[str, float]) -> np.ndarray:
    """cnn-int8's cached features as its deployed graph computes them: block means rounded to mean_scale
    (checked against the graph: the scores agree to 1e-5)."""
    x = x.copy()
    for b, step in mean_scale.items():
        c = SECTIONS[f"{b}.mean"]
        x[:, c] = np.clip(np.round(x[:, c] / step), 0, 255) * step
    return x


def int8_deployed_rows(method: str) -> dict:
    """Leave-one-group-out on cnn-int8 as its deployed graph computes the features, per group: mean over seeds."""
    feats = load_features("cnn-int8")
    scale = int8_mean_scale(feats)
    feats = {k: as_deployed_int8(v, scale) for k, v in feats.items()}
    rows = {}
    for fold in FOLDS:
        for s in SEEDS:
            r = measure(load_head(run_path(method, fold, s)), feats, fold_measured(fold))
            for g, v in r["groups"].items():
                rows.setdefault(g, []).append(v)
    return {g: float(np.mean(v)) for g, v in rows.items()}


def check_parity(onnx_path: Path, head: Head, model: str) -> float:
    """The exported graph's ood_components against the head on the cached features, on validation and a few
    groups (max abs difference of the score)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feats = load_features(model)
    src = sources()
    worst = 0.0
    for name in ("val", "silhouettes", "patterns", "icons-glyphs"):
        images = load_images(src[name])[:1000]
        got = sess.run(["ood_components"], {"image": images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0})[0][:, 0]
        worst = max(worst, float(np.abs(got - head.score(feats[name][: len(images)])).max()))
    return worst


def bench(out_root: Path, threads: int, repeats: int) -> None:
    """Images per second through ONNX Runtime, the shipped graph against the one with the head, at batch 1 and
    64 (the server's batcher), interleaved, best of `repeats`."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    test_x, _ = load_split("test", DEFAULT_DATA_DIR)
    res = {}
    for model in ("cnn", "cnn-int8"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        base = ort.InferenceSession(str(model_path(model)), opts, providers=["CPUExecutionProvider"])
        withh = ort.InferenceSession(str(out_root / model / "1/model.onnx"), opts, providers=["CPUExecutionProvider"])
        for batch in (1, 64):
            x = test_x[rng.choice(len(test_x), 4096)].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
            n = 1024 if batch == 1 else 4096
            best = {"base": 0.0, "head": 0.0}
            for _ in range(repeats):
                for key, sess, outs in (("base", base, ["probabilities", "logits"]),
                                        ("head", withh, ["probabilities", "logits", "ood_components"])):
                    t0 = time.perf_counter()
                    for i in range(0, n, batch):
                        sess.run(outs, {"image": x[i : i + batch]})
                    best[key] = max(best[key], n / (time.perf_counter() - t0))
            res[f"{model}/batch{batch}"] = {"head": json.loads((out_root / model / "1/ood.json").read_text())["head"]["fit"],
                                            "base_images_per_s": best["base"], "head_images_per_s": best["head"],
                                            "cost": 1 - best["head"] / best["base"]}
            print(f"{model} batch {batch}: {best['base']:.0f} -> {best['head']:.0f} images/s "
                  f"({(1 - best['head'] / best['base']) * 100:+.1f}% cost)", flush=True)
    import platform
    import subprocess

    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout.split(":", 1)[-1].strip()
    res["machine"] = {"cpu": cpu, "threads": threads, "python": platform.python_version(), "onnxruntime": ort.__version__,
                      "date": time.strftime("%Y-%m-%d")}
    fit = res["cnn/batch64"]["head"]
    path = RESULTS / "ood-head-throughput.json"
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres[fit] = res
    path.write_text(json.dumps(allres, indent=1) + "\n")


def fixtures(models_dir: Path) -> None:
    """tests/fixtures/ood-scores-cnn.json for the newest cnn version under `models_dir` when it carries a garment
    head: the same 20 model inputs as the fixture committed by training/ood_protocol.py (10 test garments, 10
    silhouettes), with the head's score, the class and the calibrated probability its exported graph gives."""
    import onnxruntime as ort
    from repository import latest_version_dir

    path = REPO / "tests/fixtures/ood-scores-cnn.json"
    fixture = json.loads(path.read_text())
    version_dir = latest_version_dir(models_dir, "cnn")
    meta = json.loads((version_dir / "model.json").read_text())
    if meta["ood"]["method"] != "garment_head":
        raise SystemExit(f"{version_dir} has no garment head")
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.array([i["pixels"] for i in fixture["images"]], np.float32).reshape(-1, 1, 28, 28) / 255.0
    logits, scores = sess.run(["logits", "ood_components"], {"image": x})
    z = logits.astype(np.float64) / meta["calibration"]["temperature"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for i, image in enumerate(fixture["images"]):
        image |= {"ood_score": float(scores[i, 0]), "class_id": int(p[i].argmax()), "probability": float(p[i].max())}
    fixture |= {"version": version_dir.name, "ood_method": "garment_head"}
    path.write_text(json.dumps(fixture) + "\n")
    rejected = int((scores[10:, 0] > meta["ood"]["threshold"]).sum())
    print(f"{path}: version {version_dir.name}, {rejected} of 10 silhouettes over the threshold")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--model", choices=["cnn", "cnn-int8"], required=True)
    lg = sub.add_parser("logo")
    lg.add_argument("--method", choices=list(METHODS), required=True)
    sub.add_parser("report")
    ex = sub.add_parser("export")
    ex.add_argument("--method", choices=list(METHODS), required=True)
    ex.add_argument("--seed", type=int, default=SEEDS[0])
    ex.add_argument("--class-rule", choices=CLASS_RULES,
                    help="a threshold per predicted class (amendment 10 of the protocol), in the graph")
    fx = sub.add_parser("fixtures", help="tests/fixtures/ood-scores-cnn.json for the installed head version")
    fx.add_argument("--models-dir", type=Path, default=REPO / "models")
    b = sub.add_parser("bench")
    b.add_argument("--repeats", type=int, default=5)
    for s in (e, lg, ex, b):
        s.add_argument("--threads", type=int, default=1, help="1: faster than 2 on a shared 2-core machine")
    for s in (ex, b):
        s.add_argument("--out", default=str(REPO / "build/models-head"))
    a = p.parse_args()
    t0 = time.time()
    if a.cmd == "extract":
        extract(a.model, a.threads)
    elif a.cmd == "logo":
        logo(a.method, a.threads)
    elif a.cmd == "report":
        report()
    elif a.cmd == "export":
        export(a.method, Path(a.out), a.seed, a.class_rule)
    elif a.cmd == "fixtures":
        fixtures(a.models_dir)
    else:
        bench(Path(a.out), a.threads, a.repeats)
    print(f"{a.cmd}: {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
