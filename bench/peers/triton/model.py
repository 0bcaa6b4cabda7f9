"""Peer (c): Triton's Python backend serving the ONNX model with onnxruntime (bench/run.py builds the model
repository around this file: config.pbtxt with Triton's dynamic batcher, max_batch_size 64, one CPU instance).

Triton's dynamic batcher hands `execute` every request of the batch it formed; the model concatenates their
images into one onnxruntime run and splits the result, as Triton's Python backend documentation has it.
Inputs (optional, one per request): "raw" UINT8 [n, 28, 28] raw pixels, or "encoded" BYTES [n] image files (the
same bodies this service's GRPCInferenceService and MLServer get). Output "probabilities" FP32 [n, 10]: the
same reply as the MLServer peer's. The graph's OOD output is computed too (bench/run.py passes the file this service
serves), so both run the same work per image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        # pyprep.py (the peers' preprocessing, for encoded images) lives in bench/peers.
        sys.path.insert(0, params["peers_dir"])
        from pyprep import decode

        self._decode = decode
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params["intra_op_threads"])
        self._session = ort.InferenceSession(params["onnx_path"], opts, providers=["CPUExecutionProvider"])
        # The OOD score too, where the graph has one (the garment head): the work this service does per image.
        names = {o.name for o in self._session.get_outputs()}
        self._fetch = ["probabilities"] + (["ood_components"] if "ood_components" in names else [])

    def _pixels(self, request) -> np.ndarray:
        raw = pb_utils.get_input_tensor_by_name(request, "raw")
        if raw is not None:
            return raw.as_numpy().reshape(-1, 28, 28)
        encoded = pb_utils.get_input_tensor_by_name(request, "encoded").as_numpy().reshape(-1)
        return np.stack([self._decode(bytes(e)) for e in encoded])

    def execute(self, requests):
        pixels = [self._pixels(r) for r in requests]
        x = (np.concatenate(pixels).astype(np.float32) / 255.0)[:, None]
        probs = self._session.run(self._fetch, {"image": x})[0]
        responses, at = [], 0
        for p in pixels:
            out = pb_utils.Tensor("probabilities", np.ascontiguousarray(probs[at : at + len(p)]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            at += len(p)
        return responses
