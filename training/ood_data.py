"""Builds two disjoint sets of images that are not Fashion-MNIST garments, from sources that install offline.
Writes PNG files (at their natural size; the service's own preprocessing fits them to 28x28) into
<out>/<group>/<name>.png.

--set evaluation (default, --out build/ood): measures the OOD score, never trained on.
  digits (scikit-learn's 1,797 handwritten digits), photos (crops of scikit-learn's and scikit-image's bundled
  photos: animals, people, objects, textures), noise (uniform and Gaussian), shapes (random circles,
  rectangles, lines), text (rendered words).

--set exposure (--out build/ood-exposure): outliers the CNN is fine-tuned against (outlier exposure). No source
  is shared with the evaluation set: faces (scikit-image's LFW subset), scenes (crops of the other bundled
  pictures: matplotlib's sample photos and elevation maps, scikit-image's motorcycle, retina and cell), fields
  (blurred noise, some thresholded into blobs) and scribbles (random-walk pen strokes).

    python training/ood_data.py --out build/ood
    python training/ood_data.py --set exposure --out build/ood-exposure
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PHOTOS_SKIMAGE = [
    "astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "cat", "coins", "moon", "page", "text", "clock",
    "hubble_deep_field", "immunohistochemistry", "brick", "grass", "gravel", "logo", "colorwheel", "checkerboard",
    "microaneurysms", "shepp_logan_phantom",
]
WORDS = ["hello", "bear", "OOD", "42", "gRPC", "rust", "shirt", "boot", "?!", "Zalando", "batch", "ONNX"]


def to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    lo, hi = a.min(), a.max()
    return np.zeros(a.shape, np.uint8) if hi == lo else ((a - lo) / (hi - lo) * 255).round().astype(np.uint8)


def photos(rng: np.random.Generator) -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources = {name: to_uint8(getattr(skimage.data, name)()) for name in PHOTOS_SKIMAGE}
    for name, img in zip(["china", "flower"], load_sample_images().images):
        sources[name] = to_uint8(img)
    out = {}
    for name, img in sources.items():
        out.update(crops(rng, img, name, 9))
    return out


def digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 ink intensity, light ink on dark, 8x8: upscale 4x so the decoder sees an ordinary small image.
    return {f"digit{i}-{t}": np.kron((img * 255 / 16).round().astype(np.uint8), np.ones((4, 4), np.uint8))
            for i, (img, t) in enumerate(zip(d.images, d.target))}


def noise(rng: np.random.Generator, n: int = 100) -> dict[str, np.ndarray]:
    out = {}
    for i in range(n // 2):
        out[f"uniform{i}"] = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        out[f"gaussian{i}"] = np.clip(rng.normal(128, rng.uniform(20, 80), (64, 64)), 0, 255).astype(np.uint8)
    return out


def shapes(rng: np.random.Generator, n: int = 200) -> dict[str, np.ndarray]:
    out = {}
    for i in range(n):
        img = Image.new("L", (64, 64), 0)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(0, 3)
            x0, y0 = rng.integers(0, 48, 2)
            x1, y1 = x0 + rng.integers(8, 40), y0 + rng.integers(8, 40)
            fill = int(rng.integers(120, 256))
            if kind == 0:
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            elif kind == 1:
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            else:
                draw.line([x0, y0, x1, y1], fill=fill, width=int(rng.integers(2, 6)))
        out[f"shape{i}"] = np.array(img)
    return out


def text(rng: np.random.Generator) -> dict[str, np.ndarray]:
    font = ImageFont.load_default(size=18)
    out = {}
    for i, word in enumerate(WORDS * 5):
        img = Image.new("L", (96, 40), 0)
        ImageDraw.Draw(img).text((int(rng.integers(0, 20)), int(rng.integers(0, 12))), word, fill=255, font=font)
        out[f"text{i}"] = np.array(img)
    return out


def crops(rng: np.random.Generator, img: np.ndarray, name: str, n: int) -> dict[str, np.ndarray]:
    """The full picture and `n` random square crops of 30-90% of its short side."""
    out = {f"{name}-full": img}
    h, w = img.shape
    for k in range(n):
        side = int(min(h, w) * rng.uniform(0.3, 0.9))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        out[f"{name}-crop{k}"] = img[y : y + side, x : x + side]
    return out


def faces() -> dict[str, np.ndarray]:
    import skimage.data

    return {f"face{i}": to_uint8(img) for i, img in enumerate(skimage.data.lfw_subset())}


def scenes(rng: np.random.Generator, n: int = 40) -> dict[str, np.ndarray]:
    import skimage.data
    from matplotlib import cbook

    sources = {
        "grace_hopper": to_uint8(np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")))),
        "present": to_uint8(np.asarray(Image.open(cbook.get_sample_data("Minduka_Present_Blue_Pack.png")))),
        "jacksboro": to_uint8(cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]),
        "topobathy": to_uint8(cbook.get_sample_data("topobathy.npz")["topo"]),
        "motorcycle_left": to_uint8(skimage.data.stereo_motorcycle()[0]),
        "motorcycle_right": to_uint8(skimage.data.stereo_motorcycle()[1]),
        "retina": to_uint8(skimage.data.retina()),
        "cell": to_uint8(skimage.data.cell()),
    }
    out = {}
    for name, img in sources.items():
        out.update(crops(rng, img, name, n))
    return out


def fields(rng: np.random.Generator, n: int = 300) -> dict[str, np.ndarray]:
    out = {}
    for i in range(n):
        noise_img = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8))
        a = to_uint8(np.asarray(noise_img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 8))))))
        if i % 2:  # blobs: the blurred field thresholded at a random level
            a = np.where(a > rng.integers(100, 200), 255, 0).astype(np.uint8)
        out[f"field{i}"] = a
    return out


def scribbles(rng: np.random.Generator, n: int = 400) -> dict[str, np.ndarray]:
    out = {}
    for i in range(n):
        img = Image.new("L", (64, 64), 0)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):
            x, y = rng.uniform(8, 56, 2)
            heading, points = rng.uniform(0, 2 * np.pi), []
            for _ in range(rng.integers(8, 40)):
                heading += rng.normal(0, 0.5)
                x = float(np.clip(x + 2.5 * np.cos(heading), 2, 62))
                y = float(np.clip(y + 2.5 * np.sin(heading), 2, 62))
                points.append((x, y))
            draw.line(points, fill=int(rng.integers(150, 256)), width=int(rng.integers(2, 6)), joint="curve")
        out[f"scribble{i}"] = np.array(img)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=["evaluation", "exposure"], default="evaluation")
    p.add_argument("--out", help="default: build/ood, or build/ood-exposure with --set exposure")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out or ("build/ood" if a.set == "evaluation" else "build/ood-exposure"))
    rng = np.random.default_rng(a.seed)
    if a.set == "evaluation":
        groups = {"photos": photos(rng), "digits": digits(), "noise": noise(rng), "shapes": shapes(rng), "text": text(rng)}
    else:
        groups = {"faces": faces(), "scenes": scenes(rng), "fields": fields(rng), "scribbles": scribbles(rng)}
    for group, images in groups.items():
        d = out / group
        d.mkdir(parents=True, exist_ok=True)
        for name, img in images.items():
            Image.fromarray(img).save(d / f"{name}.png")
        print(f"{group}: {len(images)} images -> {d}")


if __name__ == "__main__":
    main()
