"""Issue #36, "no class pays for the detector": one threshold per predicted class for the garment head, measured
against the single threshold that ships, on the head's own leave-one-group-out runs.

Declared before the first measurement (committed before this script was first run):
- Candidate: the shipped head (multi-mlp-ms), unchanged, with a threshold per class the CNN predicts (argmax of
  the logits, which the server has): the (1 - 0.75%) quantile of the head's score over the validation garments
  predicted as that class. The single threshold is the same quantile over all validation garments.
- Measured on the cached features of `build/ood-head/features/<model>` (`training/ood_head.py extract`), for
  each fold x seed run of `build/ood-head/runs/multi-mlp-ms` (`ood_head.py logo`): the left-out groups'
  rejected share under both rules, and, with fold "all" (the head that ships), validation and test garments
  rejected per true class.
- Rule, on validation data and the leave-one-group-out groups only (test is reported, never used to choose):
  per-class thresholds are better if the validation garments' worst class falls (it is Bag for the single
  threshold) and the worst left-out group, mean of the three seeds, loses at most 1 point. Otherwise the
  single threshold stays.

Amendment 1, declared after the first run (per-class thresholds: test Bag 0.6%, but the worst left-out group
lost 5.6 points) and before this one's: a cap, not a budget per class. Each class keeps the single threshold
unless more than 2% (the issue's bound) of the validation garments predicted as it would be rejected; then
its threshold is raised to the (1 - 2%) quantile of their scores. Same rule.

Amendment 9 of training/ood_head_protocol.md (2026-12-07, issue #36), on version 3's head: the cap again, and the
cap at the same budget ("capped_budget": the common threshold lowered until 0.75% of the validation garments are
over their class's threshold again), judged by the issue's own bars (`--amendment 9`: tests 1-3 of the amendment;
tests 4-5 are `training/product_photos_ab.py` on the exported graphs).

    .venv-train/bin/python training/ood_head_per_class.py [--model cnn]
    .venv-train/bin/python training/ood_head_per_class.py --amendment 9 \
        --method multi-mlp-ms-photos-balanced2-outphotos --out training/results/ood-head-amendment9.json

Amendment 10 is amendment 9 with the cap at 1.5% (`--amendment 10`, out `ood-head-amendment10.json`).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import CLASS_NAMES, DEFAULT_DATA_DIR, load_split  # noqa: E402
from ood_head import (CLASS_CAP, CLASS_RULES, FOLDS, SECTIONS, SEEDS, SPLIT_SEED, VAL_BUDGET, VAL_SIZE,  # noqa: E402
                      class_thresholds, fold_measured, load_features, load_head, run_path, threshold)
from train import split_train_val  # noqa: E402

METHOD = "multi-mlp-ms"


def predicted(x: np.ndarray) -> np.ndarray:
    return x[:, SECTIONS["logits"]].argmax(1)


ROUND8_CAP = 0.02  # round 8's and amendment 9's: the bar itself
RULES = ("single", "per_class", "capped", "capped_budget")


def thresholds(s_val: np.ndarray, c_val: np.ndarray, cap: float) -> tuple[float, dict[str, np.ndarray]]:
    """The single threshold, and per rule the threshold of each predicted class (`cap`: the most of a predicted
    class's validation garments the capped rules let over its threshold)."""
    single = threshold(s_val)
    per_class = np.array([np.quantile(s_val[c_val == c], 1 - VAL_BUDGET) for c in range(10)])
    return single, {"single": np.full(10, single), "per_class": per_class} | {
        rule: class_thresholds(s_val, c_val, rule, cap)[1] for rule in CLASS_RULES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--method", default=METHOD)
    ap.add_argument("--amendment", type=int, default=1, choices=(1, 9, 10),
                    help="the declared rule that decides: round 8's (1), or amendment 9 or 10 of the head's protocol "
                         "(10: amendment 9's with the cap at 1.5%%)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results/ood-head-per-class.json")
    a = ap.parse_args()
    cap = CLASS_CAP if a.amendment == 10 else ROUND8_CAP
    feats = load_features(a.model)
    train_x, train_y = load_split("train", DEFAULT_DATA_DIR)
    _, test_y = load_split("test", DEFAULT_DATA_DIR)
    _, va = split_train_val(train_x, train_y, VAL_SIZE, SPLIT_SEED)
    labels = {"val": train_y[va], "test": test_y}
    assert len(labels["val"]) == len(feats["val"]) and len(labels["test"]) == len(feats["test"])
    classes = {n: predicted(feats[n]) for n in feats}

    out = {"model": a.model, "method": a.method, "amendment": a.amendment, "val_budget": VAL_BUDGET, "class_cap": cap,
           "garments": {}, "garments_mean_of_seeds": {}, "logo": {}}
    # The shipped fits (fold "all"), each seed's thresholds from its own validation scores: the first seed's is
    # the fit that ships (round 8 judged it alone); amendment 9 judges the mean of the three.
    per_seed = []
    for seed in SEEDS:
        head = load_head(run_path(a.method, "all", seed))
        score = {n: head.score(feats[n]) for n in ("val", "test")}
        single, by_rule = thresholds(score["val"], classes["val"], cap)
        if seed == SEEDS[0]:
            out["thresholds"] = {"single": single} | {
                rule: dict(zip(CLASS_NAMES, t.tolist())) for rule, t in by_rule.items() if rule != "single"}
        garments = {}
        for n in ("val", "test"):
            garments[n] = {}
            for rule, t in by_rule.items():
                r = score[n] > t[classes[n]]
                garments[n][rule] = {
                    "overall": float(r.mean()),
                    "per_class": {CLASS_NAMES[c]: float(r[labels[n] == c].mean()) for c in range(10)}}
        per_seed.append(garments)
    out["garments"] = per_seed[0]
    out["garments_mean_of_seeds"] = {n: {rule: {
        "overall": float(np.mean([g[n][rule]["overall"] for g in per_seed])),
        "per_class": {c: float(np.mean([g[n][rule]["per_class"][c] for g in per_seed])) for c in CLASS_NAMES}}
        for rule in RULES} for n in ("val", "test")}

    for fold in FOLDS:
        rows = {rule: [] for rule in RULES}
        for seed in SEEDS:
            h = load_head(run_path(a.method, fold, seed))
            _, fold_rules = thresholds(h.score(feats["val"]), classes["val"], cap)
            for g in fold_measured(fold):
                s = h.score(feats[g])
                for rule, t in fold_rules.items():
                    rows[rule].append((g, seed, float((s > t[classes[g]]).mean())))
        out["logo"][fold] = rows

    def summary(rule: str) -> dict:
        per_group = {}
        for rows in out["logo"].values():
            for g, _, v in rows[rule]:
                per_group.setdefault(g, []).append(v)
        means = {g: float(np.mean(v)) for g, v in per_group.items()}
        worst = min(means, key=means.get)
        return {"mean_per_group": means, "worst_group": worst, "worst_mean": means[worst],
                "worst_seed": float(min(min(v) for v in per_group.values()))}

    out["summary"] = {rule: summary(rule) for rule in RULES}
    judged = out["garments"] if a.amendment == 1 else out["garments_mean_of_seeds"]
    val = judged["val"]
    worst_val = {rule: max(val[rule]["per_class"].items(), key=lambda kv: kv[1]) for rule in RULES}
    out["decision"] = {}
    for rule in RULES[1:]:
        loss = out["summary"]["single"]["worst_mean"] - out["summary"][rule]["worst_mean"]
        d = {"worst_val_class": worst_val[rule], "worst_group_loss_points": loss * 100}
        if a.amendment == 1:
            d["better"] = worst_val[rule][1] < worst_val["single"][1] and loss * 100 <= 1.0
        else:  # amendment 9's (and 10's) tests 1-3, the bars (tests 4-5 run on the exported graphs)
            d["tests"] = {"1_every_val_class_at_most_2pct": worst_val[rule][1] <= 0.02,
                          "2_every_left_out_group_at_least_95pct": out["summary"][rule]["worst_mean"] >= 0.95,
                          "3_test_garments_at_most_1pct": judged["test"][rule]["overall"] <= 0.01}
            d["better"] = all(d["tests"].values())
        out["decision"][rule] = d
    a.out.write_text(json.dumps(out, indent=1) + "\n")

    for rule in RULES:
        s = out["summary"][rule]
        g = judged
        print(f"{rule:13s}: val {g['val'][rule]['overall'] * 100:.2f}% test {g['test'][rule]['overall'] * 100:.2f}%; "
              f"worst val class {worst_val[rule][0]} {worst_val[rule][1] * 100:.2f}%; test per class "
              + ", ".join(f"{c} {v * 100:.1f}" for c, v in g["test"][rule]["per_class"].items())
              + f"; LOGO worst {s['worst_group']} {s['worst_mean'] * 100:.1f}% "
              f"(worst seed {s['worst_seed'] * 100:.1f}%)")
    for rule, d in out["decision"].items():
        verdict = "passes" if d["better"] else "does not pass"
        if a.amendment == 1:
            verdict = "better" if d["better"] else "not better"
        print(f"decision, {rule}: the worst group loses {d['worst_group_loss_points']:.1f} points; {verdict} "
              f"by the declared rule" + (f" {d['tests']}" if "tests" in d else ""))
    print(a.out)


if __name__ == "__main__":
    main()
