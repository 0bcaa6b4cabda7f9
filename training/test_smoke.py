"""Smoke test of the whole training pipeline (run by `make test-training`; needs torch, so not in `make test`):
one short epoch per model on a subset (for the CNN also one outlier-exposure epoch on the set `make ood-sets`
builds), then export, parity check, ONNX evaluation and metadata."""

import json
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent


class SmokeTraining(unittest.TestCase):
    def test_each_model_trains_exports_and_evaluates_within_two_minutes(self):
        for model in ["dense", "cnn"]:
            with self.subTest(model=model), tempfile.TemporaryDirectory() as out:
                started = time.time()
                subprocess.run([sys.executable, str(HERE / "train.py"), "--model", model, "--smoke", "--out-dir", out], check=True)
                self.assertLess(time.time() - started, 120)
                version_dir = Path(out) / model / "1"  # the first version of a new repository
                meta = json.loads((version_dir / "model.json").read_text())
                self.assertEqual(meta["metrics"]["test_images"], 10_000)
                self.assertLessEqual(meta["onnx_parity_max_abs_diff"], 1e-4)
                # One epoch on 2,500 images is far from the target but far above chance (10%).
                self.assertGreater(meta["metrics"]["test_accuracy"], 0.5)
                self.assertEqual(len(meta["classes"]), 10)
                self.assertEqual(len(meta["metrics"]["confusion_matrix"]), 10)
                phases = [row.get("phase", "main") for row in meta["training"]["history"]]
                self.assertEqual(phases, ["main", "exposure"] if model == "cnn" else ["main"])
                for file in ["model.onnx", "curves.png", "confusion.png"]:
                    self.assertTrue((version_dir / file).stat().st_size > 0)

    def test_a_wrong_data_dir_fails_with_a_clear_message(self):
        with tempfile.TemporaryDirectory() as empty:
            r = subprocess.run([sys.executable, str(HERE / "train.py"), "--model", "dense", "--smoke", "--data-dir", empty],
                               capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("dataset-fashion-mnist", r.stderr)


if __name__ == "__main__":
    unittest.main()
