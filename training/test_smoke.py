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

    def test_the_second_exposure_stage_starts_from_the_served_weights_and_reports_each_left_out_group(self):
        """The CNN's pipeline after train.py, in smoke mode: the stage-1 protocol, then exposure_stage2.py, which
        reads the network back from its ONNX file (export.load_onnx_weights) and fine-tunes it per left-out group."""
        sys.path.insert(0, str(HERE))
        import numpy as np
        import torch
        from export import load_onnx_weights, onnx_session, run_onnx
        from models import ConvNet

        with tempfile.TemporaryDirectory() as out:
            py = lambda *args: subprocess.run([sys.executable, *map(str, args)], check=True)  # noqa: E731
            py(HERE / "train.py", "--model", "cnn", "--smoke", "--out-dir", out)
            onnx_path = Path(out) / "cnn" / "1" / "model.onnx"
            x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
            with torch.no_grad():
                logits = load_onnx_weights(ConvNet(), onnx_path)(torch.from_numpy(x))[0].numpy()
            self.assertLess(np.abs(logits - run_onnx(onnx_session(onnx_path), x)["logits"]).max(), 1e-4)

            py(HERE / "ood_protocol.py", "--model", "cnn", "--models-dir", out)
            report = Path(out) / "stage2.json"
            py(HERE / "exposure_stage2.py", "--smoke", "--models-dir", out, "--report", report)
            r = json.loads(report.read_text())
            self.assertEqual([f["left_out"] for f in r["folds"]], ["photos", "digits"])
            for f in r["folds"]:
                self.assertNotIn(f"evaluation/{f['left_out']}", f["outlier_groups"], "the left-out group is never trained on")
                self.assertIn("ood-shapes/creatures", f["outlier_groups"])

            # The stage-2 version (smoke mode writes it whatever the rule says): the protocol takes its energy row
            # from the report, since the network has seen the groups.
            py(HERE / "ood_protocol.py", "--model", "cnn", "--models-dir", out)
            stage2_dir = Path(out) / "cnn" / "2"
            self.assertTrue((stage2_dir / "exposure-stage2.json").exists())
            protocol = json.loads((stage2_dir / "ood-protocol.json").read_text())["leave_one_group_out"]
            self.assertEqual(list(protocol), ["energy"], "only energy: the fusions would be measured in-sample")
            self.assertEqual(protocol["energy"]["groups"]["digits"]["rejected"], r["groups"]["digits"]["mean"])
            self.assertIn("second exposure stage", (stage2_dir / "ood-protocol.md").read_text())
            # Its INT8 copy has seen the same groups: quantize.py carries the report along for its protocol.
            py(HERE / "quantize.py", "--model", "cnn", "--models-dir", out)
            self.assertTrue((Path(out) / "cnn-int8" / "1" / "exposure-stage2.json").exists())

    def test_a_wrong_data_dir_fails_with_a_clear_message(self):
        with tempfile.TemporaryDirectory() as empty:
            r = subprocess.run([sys.executable, str(HERE / "train.py"), "--model", "dense", "--smoke", "--data-dir", empty],
                               capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("dataset-fashion-mnist", r.stderr)


if __name__ == "__main__":
    unittest.main()
