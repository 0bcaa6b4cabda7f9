"""Peer (b): a small custom MLServer runtime serving the ONNX model with onnxruntime. MLServer's adaptive
batching (max_batch_size / max_batch_time in model-settings.json) merges concurrent requests before `predict`.
Input (by datatype, whatever its name): UINT8 [n, 28, 28] raw pixels, or BYTES [n] encoded image files. Output "probabilities" FP32
[n, 10]. Each predict call records its batch size in the histogram fmnist_batch_images on MLServer's Prometheus
endpoint, so the harness can report the average formed batch as it does for the Rust service."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_metric import BATCH_IMAGES  # noqa: E402
from pyprep import decode  # noqa: E402


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        uri = Path(self.settings.parameters.uri)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self._session = ort.InferenceSession(str(uri), opts, providers=["CPUExecutionProvider"])
        # The OOD score too, where the graph has one (the garment head): the work this service does per image.
        names = {o.name for o in self._session.get_outputs()}
        self._fetch = ["probabilities"] + (["ood_components"] if "ood_components" in names else [])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = payload.inputs[0]
        if request_input.datatype == "BYTES":
            data = request_input.data.root if hasattr(request_input.data, "root") else request_input.data
            pixels = np.stack([decode(bytes(d)) for d in data])
        else:
            pixels = NumpyCodec.decode_input(request_input).reshape(-1, 28, 28)
        x = (pixels.astype(np.float32) / 255.0)[:, None]
        probs = self._session.run(self._fetch, {"image": x})[0]
        BATCH_IMAGES.observe(len(x))
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", probs)])
