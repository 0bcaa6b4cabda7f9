"""Amendments 4 to 8 of training/ood_head_protocol.md: the first shipped head (multi-mlp-ms, version 2) against
its class-balanced refit (multi-mlp-ms-balanced), amendment 3's fit with photographed garments
(multi-mlp-ms-photos), both together (multi-mlp-ms-photos-balanced) and the later amendments' methods
(CANDIDATES), from their leave-one-group-out runs (`ood_head.py logo --method ...`, run first). Amendment 5's
tests on product photos need a served graph: they are measured with `product_photos_ab.py` and reported beside
these.

For each method, on cnn (FP32) features: the worst left-out group (mean of the three seeds, and the worst seed),
and for the shipped fit of each seed (fold "all", no group left out) the validation and test garments rejected
as out of distribution, overall and per class, at the fit's own validation threshold. Writes
training/results/ood-head-balanced.json and prints the amendment's three tests.

    .venv-train/bin/python training/ood_head_balance.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ood_head as oh  # noqa: E402
from data import CLASS_NAMES, DEFAULT_DATA_DIR, load_split  # noqa: E402

BASE = "multi-mlp-ms"
CANDIDATES = ["multi-mlp-ms-balanced", "multi-mlp-ms-photos", "multi-mlp-ms-photos-balanced",
              "multi-mlp-ms-photos-balanced2", "multi-mlp-ms-pixels-photos-balanced2",
              "multi-mlp-ms-photos-balanced2-outphotos"]
OUT = oh.RESULTS / "ood-head-balanced.json"


def labels() -> dict[str, np.ndarray]:
    from train import split_train_val

    train_x, train_y = load_split("train", DEFAULT_DATA_DIR)
    _, va = split_train_val(train_x, train_y, oh.VAL_SIZE, oh.SPLIT_SEED)
    _, test_y = load_split("test", DEFAULT_DATA_DIR)
    return {"val": np.asarray(train_y)[va], "test": np.asarray(test_y)}


def shipped_fits(method: str, feats: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict:
    """Per seed: the fold-"all" head's rejected shares, overall and per class, at its validation threshold."""
    out = {}
    for seed in oh.SEEDS:
        head = oh.load_head(oh.run_path(method, "all", seed))
        s_val = head.score(feats["val"])
        t = oh.threshold(s_val)
        row = {}
        for split in ("val", "test"):
            rejected = head.score(feats[split]) > t
            row[split] = {"all": float(rejected.mean()),
                          "per_class": {CLASS_NAMES[c]: float(rejected[y[split] == c].mean()) for c in range(10)}}
            row[split]["worst_class"] = max(row[split]["per_class"].items(), key=lambda kv: kv[1])
        out[str(seed)] = row
    return out


def main() -> None:
    feats = oh.load_features("cnn")
    y = labels()
    result = {}
    for method in [BASE] + CANDIDATES:
        summary = oh.summarise(method)
        if summary is None:
            print(f"{method}: leave-one-group-out runs incomplete; run `ood_head.py logo --method {method}`")
            continue
        fits = shipped_fits(method, feats, y)
        mean = lambda split, key: float(np.mean([fits[s][split][key] for s in fits]))  # noqa: E731
        result[method] = {
            "worst_group": summary["cnn"]["worst_group"], "worst_group_mean": summary["cnn"]["worst_rejected"],
            "worst_seed": summary["cnn"]["worst_seed"],
            "groups_under_95": sorted(g for g, r in summary["cnn"]["groups"].items() if r["mean"] < oh.TARGET),
            "val_rejected_mean": mean("val", "all"), "test_rejected_mean": mean("test", "all"),
            "val_worst_class_mean": float(np.mean([fits[s]["val"]["worst_class"][1] for s in fits])),
            "test_per_class_mean": {c: float(np.mean([fits[s]["test"]["per_class"][c] for s in fits]))
                                    for c in CLASS_NAMES},
            "val_per_class_mean": {c: float(np.mean([fits[s]["val"]["per_class"][c] for s in fits]))
                                   for c in CLASS_NAMES},
            "shipped_fits": fits,
        }
        r = result[method]
        worst_test = max(r["test_per_class_mean"].items(), key=lambda kv: kv[1])
        print(f"{method:24s} worst group {r['worst_group']} {r['worst_group_mean'] * 100:.1f}% "
              f"(worst seed {r['worst_seed']['group']} {r['worst_seed']['rejected'] * 100:.1f}%); "
              f"val {r['val_rejected_mean'] * 100:.2f}% (worst class {r['val_worst_class_mean'] * 100:.2f}%); "
              f"test {r['test_rejected_mean'] * 100:.2f}% (Bag {r['test_per_class_mean']['Bag'] * 100:.2f}%, "
              f"worst {worst_test[0]} {worst_test[1] * 100:.2f}%)")
    if BASE in result:
        base = result[BASE]
        for method in CANDIDATES:
            if method not in result:
                continue
            r = result[method]
            tests = {
                "1 validation worst class falls": r["val_worst_class_mean"] < base["val_worst_class_mean"],
                "2 worst left-out group loses <= 1 point": r["worst_group_mean"] >= base["worst_group_mean"] - 0.01,
                "3 test rejected rises <= 0.2 points": r["test_rejected_mean"] <= base["test_rejected_mean"] + 0.002,
            }
            r["tests_1_to_3"] = tests
            r["passes_tests_1_to_3"] = all(tests.values())
            print(f"{method}: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in tests.items())
                  + f" -> {'passes' if r['passes_tests_1_to_3'] else 'fails'} tests 1-3")
    # Methods whose runs are not on this machine keep the figures an earlier run wrote.
    kept = json.loads(OUT.read_text()) if OUT.exists() else {}
    OUT.write_text(json.dumps(kept | result, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(oh.REPO)}")


if __name__ == "__main__":
    main()
