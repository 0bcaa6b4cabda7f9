"""Writes tests/fixtures/parity/: varied encoded images built from Fashion-MNIST test images (MIT), each taking
a different branch of the server's preprocessing (resize down and up, polarity inversion, transparency,
grayscale with alpha, JPEG, a wide aspect ratio). tests/preprocess_parity.py compares what the server makes of
them with an independent Python reference. Deterministic; run with any Python that has numpy and Pillow:

    .venv-oip/bin/python scripts/make_parity_fixtures.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests/fixtures/parity"


def garments():
    images = np.frombuffer((REPO / "tests/fixtures/test-images.u8").read_bytes(), np.uint8).reshape(-1, 28, 28)
    return images[[0, 3, 17, 42, 99]]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    boot, trouser, shirt, bag, dress = (Image.fromarray(g, mode="L") for g in garments())
    # Larger than the model's input, light on dark, in colour: resized down (Triangle filter), luma from RGB.
    big = Image.merge("RGB", [boot.resize((200, 160)), boot.resize((200, 160)).point(lambda p: p * 0.8),
                              boot.resize((200, 160)).point(lambda p: p * 0.6)])
    big.save(OUT / "resized-rgb.png")
    # A dark garment on white, as a photo: inverted back to the dataset's polarity.
    Image.eval(trouser.resize((120, 120)), lambda p: 255 - p).save(OUT / "inverted.png")
    # Transparent background: composited over white, then inverted.
    rgba = Image.merge("RGBA", [shirt.resize((90, 90))] * 3 + [shirt.resize((90, 90)).point(lambda p: 255 if p > 20 else 0)])
    rgba.save(OUT / "transparent.png")
    # Grayscale with alpha (LA), half-transparent pixels included.
    la = Image.merge("LA", [bag.resize((64, 64)), bag.resize((64, 64)).point(lambda p: min(255, p * 2))])
    la.save(OUT / "gray-alpha.png")
    # A JPEG photo of a dark garment on white, wider than tall: lossy decode, inversion, letterboxing.
    photo = Image.new("L", (300, 180), 255)
    photo.paste(Image.eval(dress.resize((180, 180)), lambda p: 255 - p), (60, 0))
    photo.convert("RGB").save(OUT / "photo.jpg", quality=90)
    # Smaller than the model's input: resized up.
    boot.resize((14, 14)).save(OUT / "small.png")
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
