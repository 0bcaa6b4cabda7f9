#!/usr/bin/env python3
"""Writes the committed test fixture: 300 Fashion-MNIST test images (30 per class, the first of each class in
test-set order) as raw pixels + labels, and a few of them as PNG files for grpcurl and client examples.

Standard library only. Source: /usr/share/datasets/fashion-mnist (MIT, see tests/fixtures/LICENSE).
"""
import gzip
import struct
import sys
import zlib
from pathlib import Path

DATA = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
PER_CLASS = 30


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
    chosen, counts = [], [0] * 10
    for i, label in enumerate(labels):
        if counts[label] < PER_CLASS:
            counts[label] += 1
            chosen.append(i)
    chosen.sort()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "test-images.u8").write_bytes(b"".join(images[i * 784 : (i + 1) * 784] for i in chosen))
    (OUT / "test-labels.u8").write_bytes(bytes(labels[i] for i in chosen))
    (OUT / "test-indices.txt").write_text("".join(f"{i}\n" for i in chosen))
    png_dir = OUT / "png"
    png_dir.mkdir(exist_ok=True)
    for c in range(10):
        i = next(i for i in chosen if labels[i] == c)
        (png_dir / f"{CLASSES[c]}-{i}.png").write_bytes(png_gray(images[i * 784 : (i + 1) * 784], 28, 28))
    print(f"wrote {len(chosen)} images to {OUT}")


if __name__ == "__main__":
    main()
