"""Peer (a): fashion_mnist.v1.Classifier in plain Python, the way a team would write it first: grpcio with a
ThreadPoolExecutor, onnxruntime called once per request (all of the request's images in one run), no batching
across requests. Same proto, same model file, same preprocessing steps and the same response fields as the Rust
service (minus its input check details), so the load generator sends both the very same bytes.

    bench/.venv/bin/python bench/peers/python_server.py --port 50061 --model models/cnn/1/model.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from protos import fmnist_stubs  # noqa: E402
from pyprep import decode  # noqa: E402

pb, pb_grpc = fmnist_stubs()

MIN_CONFIDENCE = 0.60


class Classifier(pb_grpc.ClassifierServicer):
    def __init__(self, model_path: Path, threads: int):
        meta = json.loads(model_path.with_suffix(".json").read_text())
        self.name, self.version = meta["name"], meta["version"]
        self.classes = [c["name"] for c in meta["classes"]]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.head = "ood_components" in {o.name for o in self.session.get_outputs()}

    def Classify(self, request, context):
        if not request.images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no images")
        if len(request.images) > 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many images")
        min_conf = request.min_confidence if request.HasField("min_confidence") else MIN_CONFIDENCE
        results = [None] * len(request.images)
        pixels, slots = [], []
        for i, image in enumerate(request.images):
            kind = image.WhichOneof("data")
            try:
                if kind == "raw":
                    if len(image.raw) != 784:
                        raise ValueError(f"raw image has {len(image.raw)} bytes; expected 784")
                    arr = np.frombuffer(image.raw, dtype=np.uint8).reshape(28, 28)
                elif kind == "encoded":
                    arr = decode(image.encoded)
                else:
                    raise ValueError("image has no data")
            except Exception as e:  # noqa: BLE001 - a bad image is reported in its own result
                results[i] = pb.Classification(reason=pb.REASON_UNDECODABLE, detail=str(e))
                continue
            if arr.std() < 10.0:
                results[i] = pb.Classification(reason=pb.REASON_LOW_CONTRAST, detail="blank or uniform image")
                continue
            pixels.append(arr)
            slots.append(i)
        if pixels:
            x = (np.stack(pixels).astype(np.float32) / 255.0)[:, None]
            if self.head:  # the garment head's score, as this service reads it
                probs, ood = self.session.run(["probabilities", "ood_components"], {"image": x})
                ood = ood[:, 0]
            else:
                probs, logits = self.session.run(["probabilities", "logits"], {"image": x})
                m = logits.max(1, keepdims=True)
                ood = -(m[:, 0] + np.log(np.exp(logits - m).sum(1)))
            for row, i in enumerate(slots):
                p = probs[row]
                cls = int(p.argmax())
                top = float(p[cls])
                accepted = top >= min_conf
                results[i] = pb.Classification(
                    prediction=pb.Prediction(class_id=cls, class_name=self.classes[cls], probability=top,
                                             probabilities=p.tolist(), ood_score=float(ood[row])),
                    accepted=accepted,
                    reason=pb.REASON_ACCEPTED if accepted else pb.REASON_LOW_CONFIDENCE,
                    detail=f"{self.classes[cls]} with probability {top:.2f}",
                )
        return pb.ClassifyResponse(results=results, model=self.name, model_version=self.version)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=8, help="ThreadPoolExecutor threads")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    a = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=a.workers),
                         options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    pb_grpc.add_ClassifierServicer_to_server(Classifier(a.model, a.threads), server)
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    print(f"python peer serving {a.model} on 127.0.0.1:{a.port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
