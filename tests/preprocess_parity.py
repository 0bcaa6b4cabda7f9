"""Preprocessing parity: what the server makes of varied encoded images (tests/fixtures/parity/: resized, inverted,
transparent, grayscale with alpha, JPEG, small) matches an independent reference, written here from the README's
"Preprocessing" description with Pillow and numpy, within one grey level per pixel.

The server's side comes from Classify with return_model_input (the 28x28 pixels the model saw), through the
fashion_mnist.v1 stubs tests/oip_clients.sh generates.

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


def polarity(gray: np.ndarray) -> np.ndarray:
    """A light border means a photo on a light background: invert to the dataset's black background."""
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]]).astype(np.int64)
    return 255 - gray if border.sum() > 128 * border.size else gray


def fit(gray: np.ndarray) -> np.ndarray:
    """Into 28x28, keeping the aspect ratio (triangle filter), centred on black."""
    h, w = gray.shape
    if (w, h) != (SIDE, SIDE):
        scale = SIDE / max(w, h)
        size = [min(SIDE, max(1, int(np.floor(d * scale + 0.5)))) for d in (w, h)]
        gray = np.asarray(Image.fromarray(gray).resize(tuple(size), Image.Resampling.BILINEAR))
    out = np.zeros((SIDE, SIDE), np.uint8)
    h, w = gray.shape
    oy, ox = (SIDE - h) // 2, (SIDE - w) // 2
    out[oy:oy + h, ox:ox + w] = gray
    return out


def reference(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return fit(polarity(grayscale(img)))


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
        assert diff.max() <= 1, (f"{f.name}: the server's 28x28 differs from the reference by up to {diff.max()} grey "
                                 f"levels ({int((diff > 1).sum())} pixels over 1)")
        print(f"ok - preprocessing parity: {f.name} within {diff.max()} grey level of the reference "
              f"({int((diff > 0).sum())} of 784 pixels differ)", flush=True)
    print(f"ok - preprocessing parity: {len(files)} images, worst pixel {worst} grey level")


if __name__ == "__main__":
    main()
