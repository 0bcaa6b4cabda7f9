"""Fashion-MNIST loading from the four original IDX .gz files, with the checks that catch a wrong download."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}


class DatasetError(RuntimeError):
    """The dataset files are missing or not what Fashion-MNIST should be."""


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    if not path.exists():
        raise DatasetError(
            f"{path} not found: install the Debian package `dataset-fashion-mnist` "
            f"(apt-get install dataset-fashion-mnist) or pass --data-dir with the four IDX .gz files"
        )
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file with {expected_ndim} dimensions")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: header says {dims} but holds {data.size} bytes (truncated?)")
    return data.reshape(dims)


def load_split(split: str, data_dir: Path = DEFAULT_DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N,28,28], labels int64 [N]) and checks shapes, counts and label range."""
    images_file, labels_file, count = FILES[split]
    images = _read_idx(Path(data_dir) / images_file, 3)
    labels = _read_idx(Path(data_dir) / labels_file, 1).astype(np.int64)
    if images.shape != (count, 28, 28):
        raise DatasetError(f"{split} images have shape {images.shape}, expected ({count}, 28, 28)")
    if labels.shape != (count,):
        raise DatasetError(f"{split} labels have shape {labels.shape}, expected ({count},)")
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{split} labels outside 0..9")
    return images, labels
