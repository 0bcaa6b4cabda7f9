#!/usr/bin/env python3
"""Writes the committed test fixture: 1,000 Fashion-MNIST test images (100 per class, drawn at random with a
fixed seed, so the fixture's accuracy is an unbiased estimate of the test accuracy: ±0.7 points at 94%) as raw
pixels + labels, and the first test image of each class as PNG files for grpcurl and client examples.

Standard library only. Source: /usr/share/datasets/fashion-mnist (MIT, see tests/fixtures/LICENSE).
"""
import gzip
import random
import struct
import sys
import zlib
from pathlib import Path

DATA = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
PER_CLASS = 100


def idx(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


def png_gray(pixels: bytes, w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + pixels[y * w : (y + 1) * w] for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def main() -> None:
    images = idx(DATA / "t10k-images-idx3-ubyte.gz")[16:]
    labels = idx(DATA / "t10k-labels-idx1-ubyte.gz")[8:]
    rng = random.Random(20261125)
    chosen = sorted(i for c in range(10) for i in rng.sample([i for i, l in enumerate(labels) if l == c], PER_CLASS))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "test-images.u8").write_bytes(b"".join(images[i * 784 : (i + 1) * 784] for i in chosen))
    (OUT / "test-labels.u8").write_bytes(bytes(labels[i] for i in chosen))
    (OUT / "test-indices.txt").write_text("".join(f"{i}\n" for i in chosen))
    png_dir = OUT / "png"
    png_dir.mkdir(exist_ok=True)
    for c in range(10):  # the first test image of each class
        i = next(i for i, l in enumerate(labels) if l == c)
        (png_dir / f"{CLASSES[c]}-{i}.png").write_bytes(png_gray(images[i * 784 : (i + 1) * 784], 28, 28))
    print(f"wrote {len(chosen)} images to {OUT}")


if __name__ == "__main__":
    main()
