"""The garment head's choice of source graph (`ood_head.model_path`), on a model directory made for the test."""

import json
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ood_head  # noqa: E402


def version(root: Path, model: str, n: int, method: str | None) -> None:
    d = root / "models" / model / str(n)
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"")
    if method is not None:
        (d / "model.json").write_text(json.dumps({"ood": {"method": method}}))


class ModelPath(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        self.saved, ood_head.REPO = ood_head.REPO, self.root

    def tearDown(self):
        ood_head.REPO = self.saved
        self.tmp.cleanup()

    def test_the_newest_version_without_a_head_is_the_source(self):
        version(self.root, "cnn", 1, "energy")
        version(self.root, "cnn", 2, "garment_head")
        self.assertEqual(ood_head.model_path("cnn"), self.root / "models/cnn/1/model.onnx")

    def test_a_version_being_exported_is_not_read(self):
        # export writes the new version's graph, then measures it (asking for the source again), then writes
        # its model.json: `make train` stopped here with FileNotFoundError on models/cnn/4/model.json.
        version(self.root, "cnn", 3, "energy")
        version(self.root, "cnn", 4, None)
        self.assertEqual(ood_head.model_path("cnn"), self.root / "models/cnn/3/model.onnx")


if __name__ == "__main__":
    unittest.main()
