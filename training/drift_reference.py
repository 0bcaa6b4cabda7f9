"""Measures a model version's drift reference and writes it into its model.json (`drift_reference`).

The reference is what the server's own drift metrics say over the validation split of the model's training run
(never the test set): the split is replayed as raw 28x28 images, 64 per call, through a real server of the
version, and the metrics are read back (training/serve_replay.py). So the reference and the live values are
the same numbers from the same code, and the alert rules (deploy/monitoring/alerts.rules.yml, group
fmnist-drift) compare like with like.

    python training/drift_reference.py --model cnn [--version 2] [--models-dir models]

`make train` runs it after each export (stage 9-drift-reference); it needs the release binary (`cargo build
--release`) and ONNX Runtime (`make ort`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import DEFAULT_DATA_DIR, load_split  # noqa: E402
from serve_replay import classify, delta, scrape, server, signals  # noqa: E402


def split_train_val(n: int, val_size: int, seed: int):
    """training/train.py's split (the same permutation), without importing torch."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[val_size:], perm[:val_size]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--version", help="default: the newest")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    a = p.parse_args()

    model_dir = Path(a.models_dir) / a.model
    version = a.version or max((d.name for d in model_dir.iterdir() if d.name.isdigit()), key=int)
    meta_path = model_dir / version / "model.json"
    meta = json.loads(meta_path.read_text())
    cfg = meta.get("training", {}).get("config", {})
    val_size, seed = cfg.get("val_size", 5000), cfg.get("seed", 42)
    images, _ = load_split("train", Path(a.data_dir))
    _, val_idx = split_train_val(len(images), val_size, seed)
    val = [images[i].astype(np.uint8).tobytes() for i in val_idx]

    # A repository holding only this version, so the server serves exactly it.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(model_dir / version, Path(tmp) / a.model / version)
        with server(Path(tmp), [a.model]) as (base, metrics_url, _):
            before = scrape(metrics_url)
            classify(base, a.model, val)
            after = scrape(metrics_url)
    classes = [c["name"] for c in meta["classes"]]
    s = signals(delta(after, before), a.model, version, classes)
    if s["images"] != len(val):
        raise SystemExit(f"the server counted {s['images']} images, {len(val)} were sent")
    reference = {"measured_on": f"validation split of the training run (seed {seed}, {val_size} images), "
                                f"raw 28x28, 64 per call, through the server", **s}
    meta["drift_reference"] = reference
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{a.model}/{version}: drift reference over {s['images']} validation images: model rejections "
          f"{reference['reasons'].get('out_of_distribution', 0) + reference['reasons'].get('low_confidence', 0):.4f}, "
          f"top probability mean {s['top_probability_mean']:.4f}, brightness {s['brightness_mean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
