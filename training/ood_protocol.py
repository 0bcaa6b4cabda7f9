"""Out-of-distribution rejection, round 2 (issue #16), and calibrated probabilities with an accept rule derived
from a stated target. One fixed protocol, run by `make train` for every model after its export:

1. Fixed before anything was measured (the constants below, committed before the first run):
   - the candidate detectors and their settings (CANDIDATES, KNN_BANK, KNN_K), all computed from the outputs
     the exported ONNX model already returns (`logits`, `features`);
   - the rejection budget: each threshold is the (1 - VAL_BUDGET) quantile of the score on the validation
     split (the training run's own split: held-in garments never trained on), so 0.75% of validation
     garments are rejected, a margin of about two standard errors of that quantile under the 1% test target;
   - the accept rule's target: accepted validation answers at least ACCEPT_TARGET correct.
2. Leave-one-group-out: for each evaluation group, every detector is fitted (the fusions' weights, on
   exposure) without that group and its threshold set on validation, then the group is measured. A group's
   number therefore comes from a detector that never saw anything of its kind but what other groups share.
   The detector that wins on the worst left-out group is kept (ties go to the cheaper one).
3. The kept detector is refitted on every group (its threshold, again, from validation only), then the test
   set is measured once, and so is every held-out group (--held-out-dir: images that play no part in fitting
   or choosing; added after the first run, see training/ood_data.py --set held-out).
4. Temperature scaling (Guo et al. 2017) fitted on the validation logits; ECE (15 bins) and NLL on test before
   and after; a reliability diagram.
5. The accept rule: with the OOD rule applied, the lowest calibrated top probability at which accepted
   validation answers are still >= ACCEPT_TARGET correct (the widest coverage that achieves it); its test
   accuracy and coverage are measured once, with the risk-coverage curve.

Scores (higher = less like the training data):
  msp          -max softmax probability
  energy       -logsumexp(logits)
  mahalanobis  distance of the penultimate features to the nearest class mean, one covariance shared by all
               classes (fitted on the training split only)
  knn          1 - cosine similarity of the L2-normalised features to their KNN_K-th nearest neighbour in a bank
               of KNN_BANK training images (Sun et al. 2022, subsampled so the server can hold it)
  a+b(+c)      fusion: a logistic regression on the components' standardised scores, garments from the
               training split (outside the kNN bank) against exposure outliers: the CNN's exposure set
               (build/ood-exposure), optionally the shape-variety set (build/ood-shapes), and every
               evaluation group but the one left out

Writes models/<name>/<version>/{ood.json, ood-protocol.json, ood-protocol.md, reliability.png,
risk-coverage.png} and the detector, temperature and accept rule into model.json. When the kept detector has
feature-space components, they are appended to the ONNX graph as one more output, `ood_components`
[batch, n] (one matrix product per batch in ONNX Runtime's kernels, instead of a 2,000-row scan per image in
the server), and model.json's sha256 follows; ood.json then holds the fusion only.

    python training/ood_protocol.py --model cnn     # after `make ood-sets` and the model's export
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import DEFAULT_DATA_DIR, load_split  # noqa: E402
from ood import Mahalanobis, run  # noqa: E402
from reference import reference_dir, write_reference  # noqa: E402
from repository import latest_version_dir  # noqa: E402
from train import split_train_val  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EVAL_GROUPS = ["photos", "digits", "noise", "shapes", "text", "silhouettes", "patterns"]
VAL_BUDGET = 0.0075
KNN_BANK, KNN_K = 2000, 5
FUSION_FIT_IMAGES = 5000
ACCEPT_TARGET = 0.99
ECE_BINS = 15
# name -> (components, exposure with the shape-variety set); fusions list their components.
CANDIDATES = {
    "msp": (["msp"], False),
    "energy": (["energy"], False),
    "mahalanobis": (["mahalanobis"], False),
    "knn": (["knn"], False),
    "energy+mahalanobis": (["energy", "mahalanobis"], False),
    "energy+mahalanobis/shapes": (["energy", "mahalanobis"], True),
    "energy+mahalanobis+knn": (["energy", "mahalanobis", "knn"], False),
    "energy+mahalanobis+knn/shapes": (["energy", "mahalanobis", "knn"], True),
}


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def energy(logits: np.ndarray) -> np.ndarray:
    m = logits.max(1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(1)))


def normalise(feats: np.ndarray) -> np.ndarray:
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


class Components:
    """The single scores, fitted once on the training split."""

    def __init__(self, train_feats: np.ndarray, train_labels: np.ndarray, bank_idx: np.ndarray):
        self.maha = Mahalanobis(train_feats, train_labels)
        self.bank = normalise(train_feats[bank_idx])

    def __call__(self, logits: np.ndarray, feats: np.ndarray) -> dict[str, np.ndarray]:
        sims = normalise(feats) @ self.bank.T
        kth = -np.partition(-sims, KNN_K - 1, axis=1)[:, KNN_K - 1]
        return {"msp": -softmax(logits).max(1), "energy": energy(logits), "mahalanobis": self.maha.score(feats),
                "knn": 1.0 - kth}


class Fusion:
    """Logistic regression on standardised component scores; the score is its linear part (no bias: the
    threshold takes its place)."""

    def __init__(self, components: list[str], inliers: dict[str, np.ndarray], outliers: dict[str, np.ndarray]):
        self.components = components
        x_in = np.stack([inliers[c] for c in components], 1)
        x_out = np.stack([outliers[c] for c in components], 1)
        self.mean, self.std = x_in.mean(0), x_in.std(0)
        x = (np.r_[x_in, x_out] - self.mean) / self.std
        y = np.r_[np.zeros(len(x_in)), np.ones(len(x_out))]
        self.weights = LogisticRegression(class_weight="balanced", C=1.0).fit(x, y).coef_[0]

    def __call__(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        return ((np.stack([scores[c] for c in self.components], 1) - self.mean) / self.std) @ self.weights


def load_u8(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, 784)


def threshold_at_budget(s_val: np.ndarray) -> float:
    return float(np.quantile(s_val, 1 - VAL_BUDGET))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    res = minimize_scalar(lambda log_t: nll(softmax(logits, float(np.exp(log_t))), labels), bounds=(-3, 3),
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def accept_threshold(conf: np.ndarray, correct: np.ndarray, ood: np.ndarray, target: float) -> float:
    """The lowest confidence at which accepted answers (not OOD, confidence >= it) are >= target correct."""
    order = np.argsort(-conf[~ood], kind="stable")
    c, ok = conf[~ood][order], correct[~ood][order]
    acc = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    # Only cut where the confidence changes, so ties are accepted or rejected together.
    cut = np.r_[c[1:] < c[:-1], True]
    good = np.nonzero((acc >= target) & cut)[0]
    return float(c[good[-1]]) if len(good) else 1.0


def accepted_stats(conf, correct, ood, min_conf) -> dict:
    acc = ~ood & (conf >= min_conf)
    return {"accuracy": float(correct[acc].mean()) if acc.any() else 1.0, "coverage": float(acc.mean()),
            "accepted": int(acc.sum()), "images": int(len(conf))}


def plot(path_rel: Path, path_rc: Path, test_probs_before, test_probs_after, test_labels, curve, rule) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for ax, probs, title in [(axes[0], test_probs_before, "before (T = 1)"), (axes[1], test_probs_after, "after")]:
        conf, correct = probs.max(1), probs.argmax(1) == test_labels
        accs, confs, counts = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            accs.append(correct[m].mean() if m.any() else 0)
            confs.append(conf[m].mean() if m.any() else 0)
            counts.append(m.sum())
        ax.bar(edges[:-1], accs, width=1 / ECE_BINS, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.set(xlabel="top probability", ylabel="accuracy", title=f"Test reliability {title}: ECE {ece(probs, test_labels) * 100:.2f}%")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path_rel, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], lw=2)
    ax.scatter([rule["coverage"]], [rule["accuracy"]], c="r", zorder=3,
               label=f"default rule: {rule['accuracy'] * 100:.2f}% at {rule['coverage'] * 100:.1f}% coverage")
    ax.set(xlabel="coverage (fraction of test images accepted)", ylabel="accuracy of accepted",
           title="Risk-coverage on test (OOD rule applied)", ylim=(0.93, 1.001))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path_rc, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--models-dir", default=str(REPO / "models"))
    p.add_argument("--ood-dir", default=str(REPO / "build/ood"), help="evaluation groups, <group>.u8")
    p.add_argument("--exposure-dirs", nargs="+", default=[str(REPO / "build/ood-exposure")])
    p.add_argument("--shapes-dir", default=str(REPO / "build/ood-shapes"), help="the shape-variety exposure set")
    p.add_argument("--held-out-dir", default=str(REPO / "build/ood-held-out"),
                   help="groups measured once with the kept detector, never fitted on nor chosen by")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--fixtures", help="also write Rust parity fixtures (images and expected scores) to this JSON")
    a = p.parse_args()

    version_dir = latest_version_dir(Path(a.models_dir), a.model)
    meta_path = version_dir / "model.json"
    meta = json.loads(meta_path.read_text())
    cfg = meta["training"]["config"]
    sess = ort.InferenceSession(str(version_dir / meta["file"]), providers=["CPUExecutionProvider"])

    train_x, train_y = load_split("train", Path(a.data_dir))
    train_idx, val_idx = split_train_val(train_x, train_y, cfg["val_size"], cfg["seed"])  # the training run's split
    test_x, test_y = load_split("test", Path(a.data_dir))
    _, tr_logits, tr_feats = run(sess, train_x[train_idx])
    _, va_logits, va_feats = run(sess, train_x[val_idx])
    _, te_logits, te_feats = run(sess, test_x)
    tr_y, va_y = train_y[train_idx], train_y[val_idx]
    groups = {g: run(sess, load_u8(Path(a.ood_dir) / f"{g}.u8"))[1:] for g in EVAL_GROUPS}
    exposure = [run(sess, load_u8(f))[1:] for d in a.exposure_dirs for f in sorted(Path(d).glob("*.u8"))]
    shapes = [run(sess, load_u8(f))[1:] for f in sorted(Path(a.shapes_dir).glob("*.u8"))]

    rng = np.random.default_rng(0)
    bank_idx = np.concatenate([rng.choice(np.nonzero(tr_y == c)[0], KNN_BANK // 10, replace=False) for c in range(10)])
    fit_idx = rng.choice(np.setdiff1d(np.arange(len(tr_y)), bank_idx), FUSION_FIT_IMAGES, replace=False)
    comp = Components(tr_feats, tr_y, bank_idx)
    s_fit, s_val, s_test = comp(tr_logits[fit_idx], tr_feats[fit_idx]), comp(va_logits, va_feats), comp(te_logits, te_feats)
    s_groups = {g: comp(*groups[g]) for g in EVAL_GROUPS}
    cat = lambda parts: {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}  # noqa: E731
    s_exposure, s_shapes = cat([comp(*e) for e in exposure]), cat([comp(*e) for e in shapes])

    def detector(name: str, left_out: str | None):
        components, with_shapes = CANDIDATES[name]
        if len(components) == 1:
            return lambda s: s[components[0]], None
        outliers = [s_exposure] + ([s_shapes] if with_shapes else []) + [s_groups[g] for g in EVAL_GROUPS if g != left_out]
        fusion = Fusion(components, s_fit, cat(outliers))
        return fusion, fusion

    # 2. Leave-one-group-out. A CNN through the second exposure stage has seen every evaluation group: only its
    # energy score is measured, and from the stage's own fine-tunes without each group (exposure_stage2.py).
    stage2 = cfg.get("exposure_stage2")
    candidates = {"energy": CANDIDATES["energy"]} if stage2 else CANDIDATES
    table = {}
    for name in candidates:
        if stage2:
            table[name] = stage2_row(json.loads((version_dir / "exposure-stage2.json").read_text()))
            continue
        row = {}
        for g in EVAL_GROUPS:
            score, _ = detector(name, g)
            t = threshold_at_budget(score(s_val))
            row[g] = {"rejected": float((score(s_groups[g]) > t).mean()), "threshold": t,
                      "val_rejected": float((score(s_val) > t).mean()), "test_rejected": float((score(s_test) > t).mean())}
        worst = min(EVAL_GROUPS, key=lambda g: row[g]["rejected"])
        table[name] = {"groups": row, "worst_group": worst, "worst_rejected": row[worst]["rejected"],
                       "mean_rejected": float(np.mean([row[g]["rejected"] for g in EVAL_GROUPS])),
                       "max_test_rejected": max(row[g]["test_rejected"] for g in EVAL_GROUPS)}
        print(f"{a.model} {name:30s} worst {worst:11s} {table[name]['worst_rejected'] * 100:5.1f}%  "
              + " ".join(f"{g} {row[g]['rejected'] * 100:5.1f}" for g in EVAL_GROUPS)
              + f"  test rejected <= {table[name]['max_test_rejected'] * 100:.2f}%", flush=True)
    cost = {name: (len(c), 1 if s else 0) for name, (c, s) in candidates.items()}
    chosen = max(candidates, key=lambda n: (round(table[n]["worst_rejected"], 4), -cost[n][0], -cost[n][1]))

    # 3. The kept detector, fitted on every group; its threshold from validation; test measured once.
    score, fusion = detector(chosen, None)
    threshold = threshold_at_budget(score(s_val))
    ood_val, ood_test = score(s_val) > threshold, score(s_test) > threshold
    held_out = {f.stem: float((score(comp(*run(sess, load_u8(f))[1:])) > threshold).mean())
                for f in sorted(Path(a.held_out_dir).glob("*.u8"))}
    shipped = {"method": chosen, "threshold": threshold, "val_rejected": float(ood_val.mean()),
               "test_rejected": float(ood_test.mean()), "held_out_rejected": held_out,
               "groups_rejected_in_sample": {g: float((score(s_groups[g]) > threshold).mean()) for g in EVAL_GROUPS}}
    print(f"{a.model}: held-out groups rejected: " + " ".join(f"{g} {v * 100:.1f}%" for g, v in held_out.items()))
    print(f"{a.model}: chose {chosen}, threshold {threshold:.4f}; test garments rejected {ood_test.mean() * 100:.2f}%")

    # 4. Temperature scaling.
    temperature = fit_temperature(va_logits, va_y)
    p_before, p_after = softmax(te_logits), softmax(te_logits, temperature)
    calibration = {"temperature": temperature, "fitted_on": f"{len(val_idx)}-image validation split (NLL)",
                   "test_ece_before": ece(p_before, test_y), "test_ece_after": ece(p_after, test_y),
                   "test_nll_before": nll(p_before, test_y), "test_nll_after": nll(p_after, test_y),
                   "val_ece_before": ece(softmax(va_logits), va_y), "val_ece_after": ece(softmax(va_logits, temperature), va_y),
                   "ece_bins": ECE_BINS}
    print(f"{a.model}: T = {temperature:.4f}; test ECE {calibration['test_ece_before'] * 100:.2f}% -> "
          f"{calibration['test_ece_after'] * 100:.2f}%, NLL {calibration['test_nll_before']:.4f} -> {calibration['test_nll_after']:.4f}")

    # 5. The accept rule and the risk-coverage curve.
    va_conf, va_ok = softmax(va_logits, temperature).max(1), va_logits.argmax(1) == va_y
    te_conf, te_ok = p_after.max(1), te_logits.argmax(1) == test_y
    min_conf = accept_threshold(va_conf, va_ok, ood_val, ACCEPT_TARGET)
    val_stats, test_stats = accepted_stats(va_conf, va_ok, ood_val, min_conf), accepted_stats(te_conf, te_ok, ood_test, min_conf)
    seed_rule = accepted_stats(te_conf, te_ok, ood_test, 0.60)
    curve = [accepted_stats(te_conf, te_ok, ood_test, float(c)) | {"min_confidence": float(c)}
             for c in np.r_[0.0, np.quantile(te_conf[~ood_test], np.linspace(0, 0.99, 100))]]
    accept = {"target_val_accuracy": ACCEPT_TARGET, "min_confidence": min_conf, "val": val_stats, "test": test_stats,
              "test_at_0.60": seed_rule,
              "rule": "accepted = not out of distribution and calibrated top probability >= min_confidence; "
                      "min_confidence is the lowest at which accepted validation answers are >= the target correct"}
    print(f"{a.model}: min_confidence {min_conf:.4f}: val {val_stats['accuracy'] * 100:.2f}% at {val_stats['coverage'] * 100:.1f}%, "
          f"test {test_stats['accuracy'] * 100:.2f}% at {test_stats['coverage'] * 100:.1f}% coverage")

    # Outputs: the detector's parameters, the protocol's report, the plots, model.json.
    params = {"method": chosen, "threshold": threshold, "components": CANDIDATES[chosen][0]}
    if fusion is not None:
        params["fusion"] = {"mean": fusion.mean.tolist(), "std": fusion.std.tolist(), "weights": fusion.weights.tolist()}
    in_graph = [c for c in params["components"] if c in ("mahalanobis", "knn")]
    onnx_path = version_dir / meta["file"]
    set_components_output(onnx_path, comp, in_graph)
    if in_graph:
        params["graph_output"] = {"name": COMPONENTS_OUTPUT, "components": in_graph}
        meta["outputs"] = [o for o in meta["outputs"] if o["name"] != COMPONENTS_OUTPUT] + [{
            "name": COMPONENTS_OUTPUT, "shape": ["batch", len(in_graph)], "dtype": "float32",
            "meaning": f"OOD score components on the features: {', '.join(in_graph)} (training/ood_protocol.py)"}]
    else:
        meta["outputs"] = [o for o in meta["outputs"] if o["name"] != COMPONENTS_OUTPUT]
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if sha != meta["sha256"]:  # the build id is the export date and the file's sha256 prefix (export.py)
        meta["sha256"], meta["version"] = sha, f"{meta['version'].split('.')[0]}.{sha[:8]}"
        # The export step's reference probabilities name the file's sha256: the same probabilities, new file.
        write_reference(onnx_path, a.model, reference_dir(version_dir))
    ood_file = version_dir / "ood.json"
    ood_file.write_text(json.dumps(params) + "\n")
    report = {"protocol": {"val_budget": VAL_BUDGET, "knn_bank": KNN_BANK, "knn_k": KNN_K, "accept_target": ACCEPT_TARGET,
                           "groups": {g: int(len(s_groups[g]["energy"])) for g in EVAL_GROUPS},
                           "exposure_images": int(len(s_exposure["energy"])), "shape_exposure_images": int(len(s_shapes["energy"]))},
              "leave_one_group_out": table, "chosen": shipped, "calibration": calibration, "accept": accept,
              "risk_coverage_test": curve}
    (version_dir / "ood-protocol.json").write_text(json.dumps(report, indent=1) + "\n")
    (version_dir / "ood-protocol.md").write_text(markdown(a.model, table, shipped, calibration, accept))
    plot(version_dir / "reliability.png", version_dir / "risk-coverage.png", p_before, p_after, test_y, curve, test_stats)

    meta["ood"] = {"method": chosen, "threshold": threshold, "file": ood_file.name,
                   "sha256": hashlib.sha256(ood_file.read_bytes()).hexdigest(),
                   "evaluation": {"protocol": "leave-one-group-out, thresholds from validation only (ood-protocol.md)",
                                  "worst_group": table[chosen]["worst_group"],
                                  "worst_group_rejected": table[chosen]["worst_rejected"],
                                  "val_rejected": shipped["val_rejected"], "test_rejected": shipped["test_rejected"],
                                  "held_out_rejected": held_out}}
    meta["calibration"] = calibration
    meta["accept"] = {"target_val_accuracy": ACCEPT_TARGET, "min_confidence": min_conf,
                      "val_accuracy": val_stats["accuracy"], "val_coverage": val_stats["coverage"],
                      "test_accuracy": test_stats["accuracy"], "test_coverage": test_stats["coverage"]}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    if a.fixtures:
        write_fixtures(Path(a.fixtures), Path(a.ood_dir), test_x, te_logits, te_feats, groups, comp, score, temperature, a.model, version_dir)


def stage2_row(report: dict) -> dict:
    """The energy row of the leave-one-group-out table from the second exposure stage's report: each group's
    rejected share is the mean over its seeds' fine-tunes without the group."""
    groups = {g: {"rejected": r["mean"], "rejected_min_over_seeds": r["min"],
                  "test_rejected": max(f["test_rejected"] for f in report["folds"] if f["left_out"] == g)}
              for g, r in report["groups"].items()}
    return {"groups": groups, "worst_group": report["worst_group"], "worst_rejected": report["worst_rejected"],
            "mean_rejected": float(np.mean([r["rejected"] for r in groups.values()])),
            "max_test_rejected": report["max_test_rejected"], "source": "exposure-stage2.json",
            "seeds": report["protocol"]["seeds"]}


COMPONENTS_OUTPUT = "ood_components"


def set_components_output(onnx_path: Path, comp: Components, names: list[str]) -> None:
    """Makes the graph's `ood_components` output compute `names` (Mahalanobis, kNN) from `features`, or removes
    it when `names` is empty; idempotent, so a rerun replaces what an earlier run added."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    had = any(o.name == COMPONENTS_OUTPUT for o in g.output)
    keep_nodes = [n for n in g.node if not n.name.startswith("ood/")]
    del g.node[:]
    g.node.extend(keep_nodes)
    keep_init = [i for i in g.initializer if not i.name.startswith("ood/")]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    keep_out = [o for o in g.output if o.name != COMPONENTS_OUTPUT]
    del g.output[:]
    g.output.extend(keep_out)
    if not names and not had:
        return
    const = lambda name, a: g.initializer.append(numpy_helper.from_array(np.asarray(a), f"ood/{name}"))  # noqa: E731
    node = lambda op, ins, outs, **kw: g.node.append(helper.make_node(op, ins, outs, name=f"ood/{outs[0]}", **kw))  # noqa: E731
    outs = []
    if "mahalanobis" in names:
        const("whiten_t", comp.maha.whiten.T.astype(np.float32))
        const("means", comp.maha.whitened_means.astype(np.float32))
        const("axis1", np.array([1], np.int64))
        const("axis2", np.array([2], np.int64))
        node("MatMul", ["features", "ood/whiten_t"], ["ood/z"])
        node("Unsqueeze", ["ood/z", "ood/axis1"], ["ood/z3"])
        node("Sub", ["ood/z3", "ood/means"], ["ood/diff"])
        node("Mul", ["ood/diff", "ood/diff"], ["ood/sq"])
        node("ReduceSum", ["ood/sq", "ood/axis2"], ["ood/d2"], keepdims=0)
        node("ReduceMin", ["ood/d2"], ["ood/d2min"], axes=[1], keepdims=1)
        node("Sqrt", ["ood/d2min"], ["ood/mahalanobis"])
    if "knn" in names:
        const("bank_t", comp.bank.T.astype(np.float32))
        const("eps", np.array([1e-12], np.float32))
        const("one", np.array([1.0], np.float32))
        const("k", np.array([KNN_K], np.int64))
        const("kth_start", np.array([KNN_K - 1], np.int64))
        const("kth_end", np.array([KNN_K], np.int64))
        const("axis1_", np.array([1], np.int64))
        node("ReduceL2", ["features"], ["ood/norm"], axes=[1], keepdims=1)
        node("Max", ["ood/norm", "ood/eps"], ["ood/norm_safe"])
        node("Div", ["features", "ood/norm_safe"], ["ood/unit"])
        node("MatMul", ["ood/unit", "ood/bank_t"], ["ood/sims"])
        node("TopK", ["ood/sims", "ood/k"], ["ood/top", "ood/top_index"], axis=1, largest=1, sorted=1)
        node("Slice", ["ood/top", "ood/kth_start", "ood/kth_end", "ood/axis1_"], ["ood/kth"])
        node("Sub", ["ood/one", "ood/kth"], ["ood/knn"])
    outs = [f"ood/{n}" for n in names]
    if outs:
        node("Concat", outs, [COMPONENTS_OUTPUT], axis=1)
        g.output.append(helper.make_tensor_value_info(COMPONENTS_OUTPUT, TensorProto.FLOAT, ["batch", len(names)]))
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


def write_fixtures(path: Path, ood_dir: Path, test_x, te_logits, te_feats, groups, comp, score, temperature, model,
                   version_dir) -> None:
    """20 model inputs (10 test garments, 10 silhouettes) and what the server must compute for them."""
    silhouettes = load_u8(ood_dir / "silhouettes.u8")
    images = [test_x[i].reshape(784) for i in range(10)] + [silhouettes[i * 50] for i in range(10)]
    logits = np.r_[te_logits[:10], groups["silhouettes"][0][::50][:10]]
    feats = np.r_[te_feats[:10], groups["silhouettes"][1][::50][:10]]
    s = score(comp(logits, feats))
    probs = softmax(logits, temperature)
    path.write_text(json.dumps({"model": model, "version": version_dir.name, "images": [
        {"pixels": img.astype(int).tolist(), "ood_score": float(o), "class_id": int(p.argmax()), "probability": float(p.max())}
        for img, o, p in zip(images, s, probs)]}) + "\n")
    print(f"fixtures -> {path}")


def markdown(model, table, shipped, calibration, accept) -> str:
    pct = lambda v: f"{v * 100:.1f}"  # noqa: E731
    lines = [f"# {model}: out-of-distribution rejection, leave one group out", "",
             f"Rejected share of each left-out group (%), threshold at {VAL_BUDGET * 100:g}% of validation garments, "
             "fitted without the group. Worst group in bold.", "",
             "| detector | " + " | ".join(EVAL_GROUPS) + " | worst | test garments rejected (max over folds) |",
             "|---|" + "---:|" * (len(EVAL_GROUPS) + 2)]
    for name, r in table.items():
        # A group missing from a row (a smoke run of exposure_stage2.py measures two) shows as a dash.
        cells = ["—" if g not in r["groups"] else f"**{pct(r['groups'][g]['rejected'])}**" if g == r["worst_group"]
                 else pct(r["groups"][g]["rejected"]) for g in EVAL_GROUPS]
        lines.append(f"| {name}{' (kept)' if name == shipped['method'] else ''} | " + " | ".join(cells)
                     + f" | {pct(r['worst_rejected'])} ({r['worst_group']}) | {r['max_test_rejected'] * 100:.2f} |")
    for name, r in table.items():
        if "seeds" in r:
            lines += ["", f"The network went through the second exposure stage, which saw every evaluation group, so the "
                      f"{name} row is measured on the stage's own fine-tunes without each group (exposure-stage2.json), "
                      f"the mean over seeds {', '.join(map(str, r['seeds']))}; the lowest seed per group: "
                      + ", ".join(f"{g} {pct(v['rejected_min_over_seeds'])}" for g, v in r["groups"].items()) + "."]
    lines += ["", f"Kept: **{shipped['method']}**, threshold {shipped['threshold']:.4f}: validation garments rejected "
              f"{shipped['val_rejected'] * 100:.2f}%, test garments rejected {shipped['test_rejected'] * 100:.2f}%.", "",
              "Held-out groups (added after the first run; measured once with the kept detector, never fitted on "
              "nor chosen by): " + (", ".join(f"{g} {v * 100:.1f}% rejected" for g, v in shipped["held_out_rejected"].items())
                                    or "none") + ".", "",
              f"Temperature {calibration['temperature']:.4f}: test ECE {calibration['test_ece_before'] * 100:.2f}% -> "
              f"{calibration['test_ece_after'] * 100:.2f}%, NLL {calibration['test_nll_before']:.4f} -> {calibration['test_nll_after']:.4f}.", "",
              f"Accept rule (target: accepted validation answers >= {ACCEPT_TARGET * 100:g}% correct): min_confidence "
              f"{accept['min_confidence']:.4f}. Validation: {accept['val']['accuracy'] * 100:.2f}% correct at "
              f"{accept['val']['coverage'] * 100:.1f}% coverage. Test: {accept['test']['accuracy'] * 100:.2f}% correct at "
              f"{accept['test']['coverage'] * 100:.1f}% coverage (the seed's 0.60: {accept['test_at_0.60']['accuracy'] * 100:.2f}% "
              f"at {accept['test_at_0.60']['coverage'] * 100:.1f}%).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
