"""Product photos made from Fashion-MNIST garments (issue #39), and their measurement through a running server.

A shop photographs a dark garment on a light, off-white background, with a margin around it, usually not quite
centred, lit a little unevenly, and saves it as JPEG. This script makes such photos from Fashion-MNIST images,
one declared condition at a time, then sends each file to the service as an encoded image (`fmnist classify`)
and tallies what came back.

    make           python training/product_photos.py make --split val  --out build/product-photos/val
                   python training/product_photos.py make --split test --out build/product-photos/test
    make (others)  python training/product_photos.py make --split ood --ood-dir build/ood --out build/product-photos/ood
    measure        python training/product_photos.py measure --dir build/product-photos/val --addr http://127.0.0.1:50051

Splits: `val` is the training run's own 5,000-image validation split (models/cnn/1/model.json, seed 42): the
conversion's tolerances are chosen on it. `train` draws 5,000 photos under the `mixed` condition from the other
55,000 (the training indices): the garment head's photographed garments (training/ood_head_protocol.md,
amendment 3). `test` is Fashion-MNIST's test split, measured once after they were
fixed. `ood` takes the evaluation groups of training/ood_data.py (build/ood) as the object instead of a garment:
non-garments made into the same kind of photo. `outliers` photographs 300 images of each clip-art and exposure
group the garment head trains on, one folder per group, under `mixed` (amendment 8: the head's photographed
outliers; build/ood is never drawn from, as `ood` photographs it).

How a photo is made from a 28x28 image v (0 = background, 255 = the darkest part of the original photo, as the
dataset's negation left it): scaled up (bicubic) so that its 28-pixel box fills `fill` of the canvas' shorter
side, optionally rotated, placed at an offset, then photographed as
    photo(x, y) = light(x, y) * shadow(x, y) * (1 - v(x, y) / 255) + noise
where light is the background level (255 = white), shadow darkens a blurred, shifted copy of the garment's
silhouette, and noise is Gaussian. Saved as PNG, or JPEG at the condition's quality.

The conditions are declared here, before any measurement (the issue's list): each varies one thing from the
plain photo (white background, fill 80%, centred, PNG, no noise, shadow, gradient or rotation), and `mixed`
draws all of them at random at once, as a shop's photos would vary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

PLAIN = dict(bg=255, fill=0.8, offset=0.0, jpeg=None, noise=0.0, shadow=0.0, gradient=0.0, rotation=0.0, canvas=(400, 400))

# name -> changes from PLAIN. Declared before measuring (issue #39: background levels, margins and placement,
# JPEG quality, noise, soft shadows and uneven light, small rotations).
CONDITIONS: dict[str, dict] = {
    "plain": {},
    "bg-245": {"bg": 245},
    "bg-235": {"bg": 235},
    "bg-220": {"bg": 220},
    "bg-200": {"bg": 200},
    "fill-100": {"fill": 1.0},
    "fill-60": {"fill": 0.6},
    "fill-50": {"fill": 0.5},
    "fill-35": {"fill": 0.35},
    "fill-20": {"fill": 0.2},
    "off-centre": {"fill": 0.5, "offset": 1.0},
    "jpeg-90": {"jpeg": 90},
    "jpeg-75": {"jpeg": 75},
    "jpeg-50": {"jpeg": 50},
    "noise-3": {"noise": 3.0},
    "noise-8": {"noise": 8.0},
    "noise-15": {"noise": 15.0},
    "shadow": {"shadow": 0.3},
    "shadow-strong": {"shadow": 0.5},
    "gradient": {"gradient": 0.1},
    "gradient-strong": {"gradient": 0.25},
    "rotate-5": {"rotation": 5.0},
    "rotate-10": {"rotation": 10.0},
    "mixed": {},  # every condition at random, per photo (see mixed_params)
}
# Non-garments are photographed under fewer conditions: the plain photo, the two the issue found worst, and the mix.
OOD_CONDITIONS = ("plain", "fill-50", "bg-235", "mixed")
PER_CONDITION = 300
TRAIN_PHOTOS = 5000
OUTLIER_PHOTOS = 300  # per trained-on outlier group (amendment 8)
MIXED = 1000


def mixed_params(rng: np.random.Generator) -> dict:
    """One shop photo: every condition drawn at random, within the ranges the single-condition rows span."""
    w = int(rng.integers(300, 801))
    aspect = float(rng.choice([0.75, 1.0, 1.0, 4 / 3]))
    return dict(
        bg=int(rng.integers(215, 256)),
        fill=float(rng.uniform(0.3, 0.95)),
        offset=float(rng.uniform(0.0, 1.0)),
        jpeg=int(rng.choice([95, 85, 75, 60])) if rng.random() < 0.8 else None,
        noise=float(rng.uniform(0.0, 8.0)),
        shadow=float(rng.choice([0.0, 0.0, 0.2, 0.35])),
        gradient=float(rng.uniform(0.0, 0.15)),
        rotation=float(rng.uniform(-8.0, 8.0)),
        canvas=(w, int(round(w * aspect))),
    )


def photograph(v: np.ndarray, p: dict, rng: np.random.Generator) -> Image.Image:
    """The photo of ink image `v` (uint8, any size, 0 = background) under condition `p`."""
    cw, ch = p["canvas"]
    h0, w0 = v.shape
    target = max(4, int(round(p["fill"] * min(cw, ch))))
    scale = target / max(h0, w0)
    ink = Image.fromarray(v).resize((max(1, round(w0 * scale)), max(1, round(h0 * scale))), Image.BICUBIC)
    if p["rotation"]:
        ink = ink.rotate(p["rotation"] * (1 if rng.random() < 0.5 else -1), Image.BICUBIC, expand=True)
    ink = np.asarray(ink, dtype=np.float32) / 255.0
    ih, iw = ink.shape
    if ih > ch or iw > cw:  # a rotated full-frame garment: keep the middle
        y0, x0 = max(0, (ih - ch) // 2), max(0, (iw - cw) // 2)
        ink = ink[y0:y0 + ch, x0:x0 + cw]
        ih, iw = ink.shape
    # Offset: a fraction of the free margin on each axis, in a random direction.
    fx, fy = (cw - iw) / 2, (ch - ih) / 2
    ox = int(round(fx + p["offset"] * fx * rng.uniform(-1, 1)))
    oy = int(round(fy + p["offset"] * fy * rng.uniform(-1, 1)))
    canvas = np.zeros((ch, cw), np.float32)
    canvas[oy:oy + ih, ox:ox + iw] = np.clip(ink, 0, 1)
    light = np.full((ch, cw), float(p["bg"]), np.float32)
    if p["gradient"]:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
        ramp = (np.cos(angle) * xx / cw + np.sin(angle) * yy / ch)
        ramp = (ramp - ramp.min()) / max(1e-6, ramp.max() - ramp.min())
        light *= 1 - p["gradient"] * ramp
    if p["shadow"]:
        size = max(iw, ih)
        silhouette = ndimage.gaussian_filter((canvas > 0.05).astype(np.float32), sigma=0.04 * size)
        dx, dy = (int(round(0.03 * size * s)) for s in rng.choice([-1, 1], 2))
        light *= 1 - p["shadow"] * ndimage.shift(silhouette, (dy, dx), order=1)
    photo = light * (1 - canvas)
    if p["noise"]:
        photo += rng.normal(0, p["noise"], photo.shape)
    return Image.fromarray(np.clip(np.round(photo), 0, 255).astype(np.uint8))


def sources(split: str, ood_dir: Path | None, seed: int) -> tuple[list[np.ndarray], list[int], list[str]]:
    """The images photographed: garments of a split (with labels), or the OOD groups (label -1, group name)."""
    if split == "outliers":
        # The garment head's photographed outliers (training/ood_head_protocol.md, amendment 8): a draw from each
        # clip-art and exposure group it trains on, never from build/ood, whose images the `ood` split photographs.
        import ood_head as oh

        images, labels, groups = [], [], []
        for g in oh.PHOTO_OUTLIER_GROUPS:
            x = np.frombuffer(oh.group_file(g).read_bytes(), np.uint8).reshape(-1, 28, 28)
            for i in np.random.default_rng(seed).permutation(len(x))[:OUTLIER_PHOTOS]:
                images.append(x[i])
                labels.append(-1)
                groups.append(g)
        return images, labels, groups
    if split == "ood":
        images, labels, groups = [], [], []
        for group_dir in sorted(p for p in ood_dir.iterdir() if p.is_dir()):
            files = sorted(group_dir.glob("*.png"))
            rng = np.random.default_rng(seed)
            for f in rng.permutation(files)[:100]:
                images.append(np.asarray(Image.open(f).convert("L")))
                labels.append(-1)
                groups.append(group_dir.name)
        return images, labels, groups
    from data import load_split  # training/data.py
    from train import split_train_val

    if split in ("val", "train"):
        x, y = load_split("train")
        meta = json.loads(Path("models/cnn/1/model.json").read_text())["training"]["config"]
        train_idx, val_idx = split_train_val(x, y, meta["val_size"], meta["seed"])
        idx = val_idx if split == "val" else train_idx
    else:
        x, y = load_split("test")
        idx = np.arange(len(x))
    idx = np.random.default_rng(seed).permutation(idx)
    return [x[i] for i in idx], [int(y[i]) for i in idx], ["garments"] * len(idx)


def make(a: argparse.Namespace) -> None:
    images, labels, groups = sources(a.split, a.ood_dir, a.seed)
    out = Path(a.out)
    rows = []
    if a.split == "outliers":
        # One folder per group, under the mix only, so that a fold can leave a group's photos out with the group.
        rng = np.random.default_rng([a.seed, list(CONDITIONS).index("mixed")])
        for k, (v, g) in enumerate(zip(images, groups)):
            p = mixed_params(rng)
            photo = photograph(v, p, rng)
            d = out / g
            d.mkdir(parents=True, exist_ok=True)
            f = d / f"{k:05d}.{'jpg' if p['jpeg'] else 'png'}"
            photo.save(f, **({"quality": p["jpeg"]} if p["jpeg"] else {}))
            rows.append((str(f), -1, "mixed", g))
        write_manifest(out, rows)
        return
    cursor = 0
    for ci, (name, change) in enumerate(CONDITIONS.items()):
        count = MIXED if name == "mixed" else PER_CONDITION
        if a.split == "train":
            # Training material for the garment head (training/ood_head_protocol.md, amendment 3): the mix only.
            if name != "mixed":
                continue
            count = TRAIN_PHOTOS
        if a.split == "ood":
            if name not in OOD_CONDITIONS:
                continue
            count = len(images)
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([a.seed, ci])
        for k in range(count):
            i = k if a.split == "ood" else (cursor + k) % len(images)
            p = mixed_params(rng) if name == "mixed" else PLAIN | change
            photo = photograph(images[i], p, rng)
            suffix = "jpg" if p["jpeg"] else "png"
            f = d / f"{k:05d}.{suffix}"
            if p["jpeg"]:
                photo.save(f, quality=p["jpeg"])
            else:
                photo.save(f)
            rows.append((str(f), labels[i], name, groups[i]))
        if a.split != "ood":
            cursor += count
    # The same images as the dataset (or build/ood) has them: what a photo's acceptance is compared with.
    if a.split == "train":
        cursor = 0
    name = "as-is" if a.split == "ood" else "28x28"
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    for k in range(min(len(images), cursor if a.split != "ood" else len(images))):
        f = d / f"{k:05d}.png"
        Image.fromarray(images[k]).save(f)
        rows.append((str(f), labels[k], name, groups[k]))
    write_manifest(out, rows)


def write_manifest(out: Path, rows: list[tuple]) -> None:
    with open(out / "manifest.tsv", "w") as m:
        m.write("file\tlabel\tcondition\tgroup\n")
        for r in rows:
            m.write("\t".join(map(str, r)) + "\n")
    print(f"{len(rows)} files -> {out}")


def measure(a: argparse.Namespace) -> None:
    d = Path(a.dir)
    lines = (d / "manifest.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    results = {}
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        cmd = [a.fmnist, "classify", "--addr", a.addr, "--json"] + (["--model", a.model] if a.model else [])
        out = subprocess.run(cmd + [r[0] for r in chunk], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            r = json.loads(line)
            results[r["file"]] = r
    tally: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(int))
    for f, label, condition, group in rows:
        r = results[f]
        t = tally[(condition, group)]
        t["n"] += 1
        t["accepted"] += r["accepted"]
        t["right_accepted"] += r["accepted"] and r["class_id"] == int(label)
        t["right"] += r["class_id"] is not None and r["class_id"] == int(label)
        t["ood"] += r["reason"] == "REASON_OUT_OF_DISTRIBUTION"
        t["rejected"] += not r["accepted"]
        t[f"reason:{r['reason']}"] += 1
    report = {f"{c}/{g}": dict(t) for (c, g), t in sorted(tally.items())}
    model = next(iter(results.values()))
    summary = {"dir": str(d), "model": model["model"], "model_version": model["model_version"], "rows": report}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"model {model['model']} v{model['model_version']}, {d}")
    print(f"{'condition':<28} {'n':>5} {'accepted':>9} {'right|acc':>9} {'OOD':>6} {'rejected':>9} {'right':>6}")
    for key, t in report.items():
        n = t["n"]
        acc = t["accepted"]
        print(f"{key:<28} {n:>5} {100 * acc / n:>8.1f}% {100 * t['right_accepted'] / max(acc, 1):>8.1f}% "
              f"{100 * t['ood'] / n:>5.1f}% {100 * t['rejected'] / n:>8.1f}% {100 * t['right'] / n:>5.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--split", choices=["train", "val", "test", "ood", "outliers"], required=True)
    m.add_argument("--ood-dir", type=Path, default=Path("build/ood"))
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=None, help="39, and 42 for `outliers` (amendment 8's declared seed)")
    s = sub.add_parser("measure")
    s.add_argument("--dir", required=True)
    s.add_argument("--addr", default="http://127.0.0.1:50051")
    s.add_argument("--model", default=None)
    s.add_argument("--fmnist", default="target/release/fmnist")
    s.add_argument("--json-out", default=None)
    a = p.parse_args()
    if a.cmd == "make" and a.seed is None:
        a.seed = 42 if a.split == "outliers" else 39
    make(a) if a.cmd == "make" else measure(a)


if __name__ == "__main__":
    main()
