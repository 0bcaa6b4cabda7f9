"""The CNN's second outlier-exposure stage (issue #16, round 2b), measured leave-one-group-out.

Why: the first stage exposes the CNN to build/ood-exposure only (faces, scenes, fields, scribbles and jigsawed
garments), and its energy score's worst left-out evaluation group is patterns at 91.0% rejected. The issue's
protocol asks for the exposure itself to be trained without the group it is measured on, with shape variety;
until now only the fusions' weights were fitted that way, never the network.

Fixed before the first measurement (the constants below, committed before this script first ran):
- Stage 2 starts from the stage-1 CNN as the repository serves it (its weights read back from the ONNX file,
  export.load_onnx_weights) and fine-tunes it for STAGE2_EPOCHS at STAGE2_LR with stage 1's loss (cross-entropy
  plus the energy hinges, batch norm frozen; train.expose). Its outliers: every group of build/ood-exposure,
  the shape-variety set (build/ood-shapes) and every evaluation group but the one left out, drawn with equal
  weight per group (so 6,000 noise images do not drown 400 silhouettes), plus jigsawed garments.
- Leave-one-group-out: for each seed in SEEDS and each evaluation group, one fine-tune without the group; the
  energy threshold is the (1 - VAL_BUDGET) quantile on the validation split; the group, the validation split
  and the test garments are measured. 3 seeds x 7 groups = 21 fine-tunes.
- The shipped candidate: one fine-tune on every group with each seed (3 more), so the accuracy spread is over 3
  seeds; the one shipped is SEEDS[0]'s, whatever its figures (no picking of the luckiest seed).
- Kept when the worst left-out group, averaged over the seeds, rejects more than stage 1's energy did on its
  worst group (ood-protocol.json of the stage-1 version), and the mean validation accuracy of the shipped
  candidates is at most STAGE2_MAX_VAL_DROP below stage 1's. Then the shipped candidate becomes the next
  version of the model; otherwise nothing is written but the report.
- Nothing here reads the test set to decide: test accuracy and test garments rejected are reported only.

The evaluation groups are then in-sample for the shipped model, so training/ood_protocol.py takes the energy
row of its leave-one-group-out table from this report (exposure-stage2.json in the version folder) instead of
measuring it on groups the network has seen.

    python training/exposure_stage2.py      # after `make ood-sets`, train.py and ood_protocol.py for the cnn (about an hour on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import DEFAULT_DATA_DIR, load_split  # noqa: E402
from export import export_and_evaluate, load_onnx_weights  # noqa: E402
from models import ConvNet  # noqa: E402
from ood_protocol import EVAL_GROUPS, VAL_BUDGET, load_u8  # noqa: E402
from repository import latest_version_dir, new_version_dir  # noqa: E402
from train import Config, energy, expose, split_train_val, to_tensor  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEEDS = (42, 43, 44)
STAGE2_EPOCHS = 1
STAGE2_LR = 2.5e-4  # half of stage 1's: it starts from an exposed network
STAGE2_MAX_VAL_DROP = 0.002


def outlier_pool(exposure: dict[str, np.ndarray], groups: dict[str, np.ndarray], left_out: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The exposure groups and every evaluation group but `left_out`, as model input, with sampling weights that
    give each group the same share."""
    parts = exposure | {f"evaluation/{g}": x for g, x in groups.items() if g != left_out}
    images = np.concatenate(list(parts.values())).reshape(-1, 28, 28)
    weights = np.concatenate([np.full(len(x), 1.0 / len(x)) for x in parts.values()])
    return to_tensor(images), torch.from_numpy(weights / weights.sum()), list(parts)


def energies(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Energy score and predicted class of each image."""
    model.eval()
    with torch.no_grad():
        out = [model(x[i : i + batch])[0] for i in range(0, len(x), batch)]
    logits = torch.cat(out)
    return energy(logits).numpy().astype(np.float64), logits.argmax(1).numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(REPO / "models"))
    p.add_argument("--ood-dir", default=str(REPO / "build/ood"), help="evaluation groups, <group>.u8")
    p.add_argument("--exposure-dirs", nargs="+", default=[str(REPO / "build/ood-exposure"), str(REPO / "build/ood-shapes")])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--report", default=str(REPO / "training/results/exposure-stage2.json"),
                   help="where the report goes (also copied into the new version folder when kept)")
    p.add_argument("--smoke", action="store_true",
                   help="check the plumbing: 3,000 training images, one seed, two groups; writes the version whatever "
                        "the rule says, so --models-dir must not be the repository's")
    a = p.parse_args()
    if a.smoke and Path(a.models_dir).resolve() == (REPO / "models").resolve():
        raise SystemExit("error: --smoke writes a version without earning it: give it another --models-dir")
    seeds, eval_groups = (SEEDS[:1], EVAL_GROUPS[:2]) if a.smoke else (SEEDS, EVAL_GROUPS)
    torch.set_num_threads(a.threads)

    stage1_dir = latest_version_dir(Path(a.models_dir), "cnn")
    stage1 = json.loads((stage1_dir / "model.json").read_text())
    if stage1["training"]["config"].get("exposure_stage2"):
        raise SystemExit(f"error: {stage1_dir} already went through stage 2; its input is a stage-1 version")
    stage1_logo = json.loads((stage1_dir / "ood-protocol.json").read_text())["leave_one_group_out"]["energy"]
    known = {f.name for f in fields(Config)}
    cfg = Config(**{k: v for k, v in stage1["training"]["config"].items() if k in known})
    cfg.threads = a.threads

    images, labels = load_split("train", Path(a.data_dir))
    train_idx, val_idx = split_train_val(images, labels, cfg.val_size, cfg.seed)  # stage 1's split
    if a.smoke:
        train_idx = train_idx[:3000]
    x_train, y_train = to_tensor(images[train_idx]), torch.from_numpy(labels[train_idx])
    x_val, y_val = to_tensor(images[val_idx]), torch.from_numpy(labels[val_idx])
    test_x, test_y = load_split("test", Path(a.data_dir))
    x_test = to_tensor(test_x)
    groups = {g: load_u8(Path(a.ood_dir) / f"{g}.u8") for g in EVAL_GROUPS}
    x_groups = {g: to_tensor(x.reshape(-1, 28, 28)) for g, x in groups.items()}
    dirs = [Path(d) for d in a.exposure_dirs]
    exposure = {f"{d.name}/{f.stem}": load_u8(f) for d in dirs for f in sorted(d.glob("*.u8"))}
    first_epoch = len(stage1["training"]["history"]) + 1

    def fine_tune(seed: int, left_out: str | None):
        model = load_onnx_weights(ConvNet(), stage1_dir / stage1["file"])
        pool, weights, names = outlier_pool(exposure, groups, left_out)
        torch.manual_seed(seed)
        history = expose(cfg, model, x_train, y_train, x_val, y_val, pool, first_epoch, epochs=STAGE2_EPOCHS,
                         lr=STAGE2_LR, weights=weights, seed=seed, label="exposure2")
        e_val, p_val = energies(model, x_val)
        e_test, p_test = energies(model, x_test)
        t = float(np.quantile(e_val, 1 - VAL_BUDGET))
        row = {"seed": seed, "left_out": left_out, "threshold": t, "outlier_groups": names,
               "val_accuracy": float((p_val == y_val.numpy()).mean()), "val_rejected": float((e_val > t).mean()),
               "test_accuracy": float((p_test == test_y).mean()), "test_rejected": float((e_test > t).mean())}
        if left_out is not None:
            row["rejected"] = float((energies(model, x_groups[left_out])[0] > t).mean())
        return model, history, row

    t0 = time.time()
    folds, finals, shipped = [], [], None
    for seed in seeds:
        for g in eval_groups:
            _, _, row = fine_tune(seed, g)
            folds.append(row)
            print(f"stage 2 seed {seed} without {g:11s}: {g} {row['rejected'] * 100:5.1f}% rejected, test garments "
                  f"{row['test_rejected'] * 100:.2f}%, val acc {row['val_accuracy'] * 100:.2f}% "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    for seed in seeds:
        model, history, row = fine_tune(seed, None)
        finals.append(row)
        print(f"stage 2 seed {seed} on every group: val acc {row['val_accuracy'] * 100:.2f}%, test acc "
              f"{row['test_accuracy'] * 100:.2f}%, test garments rejected {row['test_rejected'] * 100:.2f}%", flush=True)
        if seed == SEEDS[0]:
            shipped = (model, history)

    per_group = {g: [r["rejected"] for r in folds if r["left_out"] == g] for g in eval_groups}
    mean_group = {g: float(np.mean(v)) for g, v in per_group.items()}
    worst = min(eval_groups, key=lambda g: mean_group[g])
    worst_per_seed = {s: min((r["rejected"], r["left_out"]) for r in folds if r["seed"] == s) for s in seeds}
    val_accs = [r["val_accuracy"] for r in finals]
    stage1_val = stage1["validation"]["val_acc"]
    kept = mean_group[worst] > stage1_logo["worst_rejected"] and np.mean(val_accs) >= stage1_val - STAGE2_MAX_VAL_DROP
    report = {
        "protocol": {"seeds": list(seeds), "epochs": STAGE2_EPOCHS, "lr": STAGE2_LR, "val_budget": VAL_BUDGET,
                     "max_val_drop": STAGE2_MAX_VAL_DROP, "start": f"{stage1_dir.name} ({stage1['version']})",
                     "exposure_dirs": [d.name for d in dirs]},
        "stage1": {"worst_group": stage1_logo["worst_group"], "worst_rejected": stage1_logo["worst_rejected"],
                   "groups": {g: stage1_logo["groups"][g]["rejected"] for g in eval_groups}, "val_acc": stage1_val,
                   "test_accuracy": stage1["metrics"]["test_accuracy"]},
        "groups": {g: {"mean": mean_group[g], "min": float(min(v)), "max": float(max(v)), "by_seed": v}
                   for g, v in per_group.items()},
        "worst_group": worst, "worst_rejected": mean_group[worst],
        "worst_per_seed": {str(s): {"group": g, "rejected": v} for s, (v, g) in worst_per_seed.items()},
        "max_test_rejected": max(r["test_rejected"] for r in folds),
        "folds": folds, "finals": finals,
        "accuracy": {"val_mean": float(np.mean(val_accs)), "val_min": float(min(val_accs)),
                     "test_mean": float(np.mean([r["test_accuracy"] for r in finals])),
                     "test_min": float(min(r["test_accuracy"] for r in finals)),
                     "test_max": float(max(r["test_accuracy"] for r in finals))},
        "kept": bool(kept), "shipped_seed": SEEDS[0], "seconds": round(time.time() - t0, 1),
    }
    print(f"stage 2: worst left-out group {worst} {mean_group[worst] * 100:.1f}% (mean of {len(seeds)} seeds; worst "
          f"seed {min(worst_per_seed.values())[0] * 100:.1f}%) against stage 1's {stage1_logo['worst_group']} "
          f"{stage1_logo['worst_rejected'] * 100:.1f}%; val accuracy {np.mean(val_accs) * 100:.2f}% "
          f"(stage 1 {stage1_val * 100:.2f}%): {'kept' if kept else 'not kept'}", flush=True)
    Path(a.report).parent.mkdir(parents=True, exist_ok=True)
    Path(a.report).write_text(json.dumps(report, indent=1) + "\n")
    if not kept and not a.smoke:
        return 0

    model, history = shipped
    final = finals[0]
    cfg_out = stage1["training"]["config"] | {"exposure_stage2": report["protocol"] | {"seed": SEEDS[0]}}
    version_dir = new_version_dir(Path(a.models_dir), "cnn")
    (version_dir / "exposure-stage2.json").write_text(json.dumps(report, indent=1) + "\n")
    best = {"epoch": history[-1]["epoch"], "val_loss": history[-1]["val_loss"], "val_acc": final["val_accuracy"]}
    export_and_evaluate(model, cfg=cfg_out, history=stage1["training"]["history"] + history, best=best,
                        train_seconds=stage1["training"]["seconds"] + history[-1]["seconds"], x_val=x_val,
                        out_dir=version_dir, data_dir=Path(a.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
