"""Preprocessing for the Python peers, the same steps as the Rust service (src/preprocess.rs): decode, grayscale
(alpha over white), invert when the border is light, fit into 28x28 keeping the aspect ratio, centred on black."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode(data: bytes) -> np.ndarray:
    """An encoded image file -> uint8 [28, 28], 0 = background. Raises on undecodable bytes."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    gray = np.asarray(img.convert("L"))
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    if border.mean() > 128:
        gray = 255 - gray
    h, w = gray.shape
    if (h, w) == (28, 28):
        return np.ascontiguousarray(gray)
    scale = 28 / max(h, w)
    nw, nh = max(1, min(28, round(w * scale))), max(1, min(28, round(h * scale)))
    small = np.asarray(Image.fromarray(gray).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((28, 28), dtype=np.uint8)
    oy, ox = (28 - nh) // 2, (28 - nw) // 2
    out[oy : oy + nh, ox : ox + nw] = small
    return out
