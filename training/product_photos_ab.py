"""Tests 4 and 5 of a garment-head amendment (training/ood_head_protocol.md, amendment 5's rule): the served models
and a candidate export, each served by the service itself, measured side by side on the product photos.

    .venv-train/bin/python training/product_photos_ab.py --candidate /tmp/head8 --label "amendment 8" \\
        --out training/results/product-photos-amendment8.json

Starts `fmnist serve` twice on ephemeral ports (training/serve_replay.py's `server`: `--models-dir models`, and
`--models-dir CANDIDATE`, whose only version of each model is the export), runs `product_photos.py measure` with `--model` (cnn-int8 by default, the
amendments' model) on build/product-photos/{val,ood,test} against each, and prints:
- test 4: the photographed validation garments rejected as out of distribution (every row but `28x28/garments`),
  which must not rise;
- test 5: the non-garment product photos rejected for any reason (every row of the `ood` split), which must not
  fall (amendments 5-8), or must be at least `--ood-floor` (amendments 9 and 10: 0.95);
- reported, not tested: the photographed test garments rejected as out of distribution.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_replay import server  # noqa: E402  (a real server on ephemeral ports, ready when OIP says so)

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "build/product-photos"
FMNIST = REPO / "target/release/fmnist"
MODELS = ["cnn", "cnn-int8"]


def measure(split: str, addr: str, model: str, out: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "training/product_photos.py"), "measure", "--dir",
                    str(PHOTOS / split), "--addr", addr, "--model", model, "--fmnist", str(FMNIST),
                    "--json-out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def share(run: dict, key: str, rows=lambda name: True) -> tuple[int, int]:
    picked = [r for name, r in run["rows"].items() if rows(name)]
    return sum(r[key] for r in picked), sum(r["n"] for r in picked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidate", type=Path, required=True, help="the export's --out folder")
    ap.add_argument("--served", type=Path, default=REPO / "models",
                    help="the models the candidate is measured against (default: models/, whose newest version is "
                         "served); a folder holding only an older version reproduces a past amendment's baseline")
    ap.add_argument("--label", required=True)
    ap.add_argument("--model", default="cnn-int8")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ood-floor", type=float,
                    help="test 5 as amendments 9 and 10 word it: at least this share of the non-garment photos "
                         "rejected (e.g. 0.95), instead of amendment 5's 'does not fall'")
    a = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = {name: stack.enter_context(server(models_dir, MODELS))[0]
                   for name, models_dir in (("served", a.served), (a.label, a.candidate))}
        for split in ("val", "ood", "test"):
            for name, addr in servers.items():
                runs[f"{split}: {name}"] = measure(split, addr, a.model, Path(tmp) / f"{split}-{len(runs)}.json")
    photos = lambda name: name != "28x28/garments"  # noqa: E731
    served, cand = "served", a.label
    figures = {}
    for name in (served, cand):
        figures[name] = {
            "val_photos_ood": share(runs[f"val: {name}"], "ood", photos),
            "ood_rejected": share(runs[f"ood: {name}"], "rejected"),
            "test_photos_ood": share(runs[f"test: {name}"], "ood", photos),
        }
    pct = lambda kn: 100 * kn[0] / kn[1]  # noqa: E731
    tests = {
        "4 validation garment photos rejected as OOD do not rise":
            pct(figures[cand]["val_photos_ood"]) <= pct(figures[served]["val_photos_ood"]),
    }
    if a.ood_floor is None:
        tests["5 non-garment product photos rejected do not fall"] = (
            pct(figures[cand]["ood_rejected"]) >= pct(figures[served]["ood_rejected"]))
    else:
        tests[f"5 at least {a.ood_floor:.0%} of the non-garment product photos rejected"] = (
            pct(figures[cand]["ood_rejected"]) >= 100 * a.ood_floor)
    version = runs[f"val: {served}"]["model_version"]
    for name, f in figures.items():
        shown = f"served (version {version} of {a.served})" if name == served else name
        print(f"{shown}: validation garment photos OOD {pct(f['val_photos_ood']):.2f}% of {f['val_photos_ood'][1]}, "
              f"non-garment photos rejected {pct(f['ood_rejected']):.2f}% of {f['ood_rejected'][1]}, "
              f"test garment photos OOD {pct(f['test_photos_ood']):.2f}% (reported)")
    for test, ok in tests.items():
        print(f"test {test}: {'passes' if ok else 'fails'}")
    what = (f"training/product_photos_ab.py, model {a.model} named, version {version} of {a.served} (served) and "
            f"{a.label}'s export ({a.candidate}) side by side, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    a.out.write_text(json.dumps({"what": what, "figures": figures, "tests_4_5": tests, "runs": runs}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
