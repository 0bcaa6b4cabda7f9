"""Reads a capture the server wrote (`--capture-dir`, docs/drift.md) once people have labelled it, and turns it
into the files the training pipeline reads.

A capture is a directory of `capture-*.jsonl` segments, one JSON object per image: the 28x28 input the model
saw (`pixels`, base64 of 784 bytes, light garment on 0), its verdict and scores, the model version and the time,
and `label`, empty when captured. Labelling means writing into `label` either `not_garment` or the name of a
Fashion-MNIST class (`Shirt`, `Ankle boot`, ...; `garment` when the class is not known). Unlabelled lines are
skipped.

    python training/captures.py export --dir CAPTURE --out build/captured

writes, beside a summary:
- `not-garments.u8`: the images labelled not_garment, 784 bytes each. Put the directory in --exposure-dirs of
  training/train.py or exposure_stage2.py to fine-tune against them (outlier exposure), or pass it as an
  evaluation group (training/ood_protocol.py reads `<group>.u8`).
- `garments.u8` and `garments.labels` (one class id per byte, 255 for `garment` without a class): garments the
  model rejected, for evaluating what the detector and the accept rule cost.

Standard library only, so the tests can read captures without the training environment.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
NOT_GARMENT = "not_garment"
GARMENT = "garment"


@dataclass
class Labelled:
    """The labelled images of a capture, in file and line order."""
    images: list[bytes] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    unlabelled: int = 0

    def garment(self, i: int) -> bool:
        return self.labels[i] != NOT_GARMENT


def read_captures(directory: Path) -> Labelled:
    """Every labelled image of the capture in `directory`; a label that is neither not_garment, garment nor a
    class name is an error (a typo would otherwise train on the wrong side)."""
    out = Labelled()
    for path in sorted(Path(directory).glob("capture-*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            label = record.get("label", "").strip()
            if not label:
                out.unlabelled += 1
                continue
            if label not in (NOT_GARMENT, GARMENT, *CLASSES):
                raise ValueError(f"{path}:{n}: label {label!r} is not {NOT_GARMENT}, {GARMENT} or a class name")
            pixels = base64.b64decode(record["pixels"])
            if len(pixels) != 784:
                raise ValueError(f"{path}:{n}: {len(pixels)} bytes of pixels, expected 784")
            out.images.append(pixels)
            out.labels.append(label)
    return out


def export(directory: Path, out_dir: Path) -> dict:
    labelled = read_captures(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    outliers = [img for i, img in enumerate(labelled.images) if not labelled.garment(i)]
    garments = [(img, lab) for img, lab in zip(labelled.images, labelled.labels) if lab != NOT_GARMENT]
    (out_dir / "not-garments.u8").write_bytes(b"".join(outliers))
    (out_dir / "garments.u8").write_bytes(b"".join(img for img, _ in garments))
    (out_dir / "garments.labels").write_bytes(bytes(CLASSES.index(lab) if lab in CLASSES else 255
                                                    for _, lab in garments))
    summary = {"not_garments": len(outliers), "garments": len(garments), "unlabelled": labelled.unlabelled}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the labelled images as .u8 files the training pipeline reads")
    e.add_argument("--dir", required=True, type=Path, help="the capture directory (--capture-dir)")
    e.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    print(json.dumps(export(a.dir, a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
