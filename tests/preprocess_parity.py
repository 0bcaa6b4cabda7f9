"""Preprocessing parity: what the server makes of varied encoded images (tests/fixtures/parity/: resized, inverted,
transparent, grayscale with alpha, JPEG, small) matches an independent reference, written here from docs/api.md's
"Preprocessing" steps with Pillow and numpy, within two grey levels per pixel.

The server's side comes from Classify with return_model_input (the 28x28 pixels the model saw), through the
fashion_mnist.v1 stubs tests/oip_clients.sh generates. That server runs with --sharpen-sigma 0: the unsharp mask
is the image crate's own, tested there and by the Rust unit tests; every other step is reproduced here.

usage: preprocess_parity.py GRPC_ADDR
"""

import sys
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from fashion_mnist.v1 import classifier_pb2, classifier_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SIDE = 28
ALLOWED = 2


def grayscale(img: Image.Image) -> np.ndarray:
    """Luma (BT.709 weights, integer, as the decoder's conversion), transparency composited over white."""
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA")
    a = np.asarray(img).astype(np.int64)
    if img.mode in ("L", "LA"):
        luma = a if img.mode == "L" else a[..., 0]
    else:
        luma = (2126 * a[..., 0] + 7152 * a[..., 1] + 722 * a[..., 2]) // 10000
    if img.mode in ("LA", "RGBA"):
        alpha = a[..., -1]
        luma = (luma * alpha + 255 * (255 - alpha) + 127) // 255
    return luma.astype(np.uint8)


def light_border(gray: np.ndarray) -> bool:
    """A 28x28 file's border mean above mid-grey means a light background."""
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]]).astype(np.int64)
    return border.sum() > 128 * border.size


def median(values: np.ndarray) -> float:
    """The lower median, as a histogram walk gives it."""
    v = np.sort(values.astype(np.int64).ravel())
    return float(v[(len(v) - 1) // 2])


def ink(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """How far each pixel stands out from the background, a plane through the median of each side."""
    h, w = gray.shape
    top, bottom, left, right = median(gray[0]), median(gray[-1]), median(gray[:, 0]), median(gray[:, -1])
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    light = median(border) > 128
    ty = np.arange(h, dtype=np.float32)[:, None] * np.float32(1 / (max(h, 2) - 1))
    tx = np.arange(w, dtype=np.float32)[None, :] * np.float32(1 / (max(w, 2) - 1))
    level = np.float32(top) + np.float32(bottom - top) * ty + np.float32(right - left) * (tx - np.float32(0.5))
    p = gray.astype(np.float32)
    if light:
        level = np.clip(level, 1, 255)
        out = 255 * (level - p) / level
    else:
        level = np.clip(level, 0, 254)
        out = 255 * (p - level) / (255 - level)
    return np.round(np.clip(out, 0, 255)).astype(np.uint8), light


def content_box(a: np.ndarray, tolerance: int) -> tuple[int, int, int, int] | None:
    """Cells of k x k pixels (k: the longer side over 112, rounded up) whose mean exceeds the tolerance; then each
    edge refined, inside its edge cell, to the first row or column with max(2, n/100) pixels over it."""
    h, w = a.shape
    k = max(1, -(-max(w, h) // 112))
    ch, cw = -(-h // k), -(-w // k)
    padded = np.zeros((ch * k, cw * k), np.int64)
    counts = np.zeros_like(padded)
    padded[:h, :w] = a
    counts[:h, :w] = 1
    sums = padded.reshape(ch, k, cw, k).sum(axis=(1, 3))
    n = counts.reshape(ch, k, cw, k).sum(axis=(1, 3))
    marked = sums > tolerance * n
    rows, cols = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    if len(rows) == 0:
        return None
    x0, x1 = cols[0] * k, min(w, (cols[-1] + 1) * k)
    y0, y1 = rows[0] * k, min(h, (rows[-1] + 1) * k)
    over = a > tolerance
    needed = lambda n: min(n, max(2, n // 100))  # noqa: E731
    column = lambda x: over[y0:y1, x].sum() >= needed(y1 - y0)  # noqa: E731
    row = lambda y: over[y, x0:x1].sum() >= needed(x1 - x0)  # noqa: E731
    left = next((x for x in range(x0, min(x0 + k, x1)) if column(x)), x0)
    right = next((x + 1 for x in reversed(range(max(x1 - k, left), x1)) if column(x)), x1)
    top = next((y for y in range(y0, min(y0 + k, y1)) if row(y)), y0)
    bottom = next((y + 1 for y in reversed(range(max(y1 - k, top), y1)) if row(y)), y1)
    return left, top, right, bottom


def convert(gray: np.ndarray, tolerance: int = 16) -> np.ndarray:
    h, w = gray.shape
    if (w, h) == (SIDE, SIDE):
        return 255 - gray if light_border(gray) else gray
    a, _ = ink(gray)
    box = content_box(a, tolerance)
    out = np.zeros((SIDE, SIDE), np.uint8)
    if box is None:
        return out
    left, top, right, bottom = box
    crop = a[top:bottom, left:right]
    ch, cw = crop.shape
    scale = SIDE / max(cw, ch)
    size = [min(SIDE, max(1, int(np.floor(d * scale + 0.5)))) for d in (cw, ch)]
    small = np.asarray(Image.fromarray(crop).resize(tuple(size), Image.Resampling.BILINEAR)).astype(np.int64)
    small = (np.maximum(small - tolerance, 0) * 255 + (255 - tolerance) // 2) // (255 - tolerance)
    sh, sw = small.shape
    oy, ox = (SIDE - sh) // 2, (SIDE - sw) // 2
    out[oy:oy + sh, ox:ox + sw] = small
    return out


def reference(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return convert(grayscale(img))


def main():
    files = sorted((REPO / "tests/fixtures/parity").iterdir())
    assert len(files) >= 6, files
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        reply = stub.Classify(classifier_pb2.ClassifyRequest(
            images=[classifier_pb2.Image(encoded=f.read_bytes()) for f in files], return_model_input=True))
    worst = 0
    for f, result in zip(files, reply.results):
        served = np.frombuffer(result.model_input, np.uint8).reshape(SIDE, SIDE).astype(np.int64)
        diff = np.abs(served - reference(f).astype(np.int64))
        worst = max(worst, int(diff.max()))
        # The resize filters (the image crate's triangle, Pillow's bilinear) round differently by up to one grey
        # level; stretching the ink back over 0-255 after the background tolerance (x 255/239) makes that two.
        assert diff.max() <= ALLOWED, (f"{f.name}: the server's 28x28 differs from the reference by up to "
                                       f"{diff.max()} grey levels ({int((diff > ALLOWED).sum())} pixels over {ALLOWED})")
        print(f"ok - preprocessing parity: {f.name} within {diff.max()} grey level of the reference "
              f"({int((diff > 0).sum())} of 784 pixels differ)", flush=True)
    print(f"ok - preprocessing parity: {len(files)} images, worst pixel {worst} grey level")


if __name__ == "__main__":
    main()
