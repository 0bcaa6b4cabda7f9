"""Reference outputs, independent of the service: each shipped model's probabilities for the committed fixture
images (tests/fixtures/test-images.u8, 1,000 test-set images), computed here with Python onnxruntime from the
ONNX file alone. The service must reproduce them per image (tests/integration/reference_outputs.rs).

Written by the export step (export.py, quantize.py) for every model it makes; for the newest shipped versions:

    bench/.venv/bin/python training/reference.py --model cnn --model cnn-int8 --model dense

Output: tests/fixtures/reference/<model>.probabilities.f32 (1,000 x 10 little-endian float32) and
<model>.json (the sha256 of the ONNX file they came from, so a retrained model without new references fails).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from repository import latest_version_dir

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests/fixtures/test-images.u8"
OUT = REPO / "tests/fixtures/reference"


def reference_dir(version_dir: Path) -> Path:
    """Where the export step writes references: the committed fixtures for a version of the shipped repository
    (models/<name>/<version>), and beside any other output folder (a smoke test's temporary one) so the
    committed references stay those of models/."""
    shipped = version_dir.resolve().parent.parent == (REPO / "models").resolve()
    return OUT if shipped else version_dir / "reference"


def write_reference(onnx_path: Path, name: str, out_dir: Path = OUT) -> Path:
    images = np.frombuffer(FIXTURE.read_bytes(), np.uint8).reshape(-1, 1, 28, 28)
    # The model's contract (metadata input.scaling): pixel / 255, in float32.
    x = images.astype(np.float32) / np.float32(255.0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    # One image per run: no batch, so nothing depends on how a server groups images.
    probs = np.concatenate([sess.run(["probabilities"], {"image": x[i : i + 1]})[0] for i in range(len(x))])
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.probabilities.f32"
    target.write_bytes(probs.astype("<f4").tobytes())
    (out_dir / f"{name}.json").write_text(json.dumps({
        "model": name,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "images": FIXTURE.relative_to(REPO).as_posix(),
        "count": int(len(probs)),
        "onnxruntime": ort.__version__,
        "scaling": "pixel / 255 (float32 division)",
    }, indent=2) + "\n")
    print(f"{name}: reference probabilities for {len(probs)} fixture images -> {target}")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    a = ap.parse_args()
    for name in a.model:
        version_dir = latest_version_dir(a.models_dir, name)
        meta = json.loads((version_dir / "model.json").read_text())
        write_reference(version_dir / meta["file"], name)


if __name__ == "__main__":
    main()
