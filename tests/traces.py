"""OpenTelemetry traces end to end: an OTLP/gRPC receiver (OpenTelemetry's generated trace service, from PyPI's
opentelemetry-proto) and the release server started with --otlp-endpoint pointing at it.

Two calls carry W3C traceparents of two different traces and arrive together, so one batch serves both. Checked:
- each call's `rpc` span continues its caller's trace, as a child of the caller's span id;
- `preprocess`, `queue_wait` and `inference` are children of that `rpc` span, in the same trace;
- one `inference_batch` span links both calls' `rpc` spans (one batch, many parents), and each call's
  `inference` span links the batch;
- attributes: model, version, images and the count of each reason; the resource's service.name.
Run by tests/traces.sh (part of make test), with .venv-oip's Python.
"""

import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from fashion_mnist.v1 import classifier_pb2 as pb, classifier_pb2_grpc as pb_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp, trace_service_pb2_grpc as otlp_grpc

ROOT = Path(__file__).resolve().parent.parent
IMAGES = (ROOT / "tests/fixtures/test-images.u8").read_bytes()
LABELS = (ROOT / "tests/fixtures/test-labels.u8").read_bytes()


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def ok(message):
    print(f"ok - {message}")


class Receiver(otlp_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self):
        self.spans, self.resources = [], []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                self.resources.append(resource_spans.resource)
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)
        return otlp.ExportTraceServiceResponse()


def attributes(span):
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def main():
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()

    log = tempfile.NamedTemporaryFile(prefix="fmnist-traces-", suffix=".log", delete=False)
    # A long batch window, so the two calls sent together share a batch.
    server = subprocess.Popen(
        [str(ROOT / "target/release/fmnist"), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--models-dir", str(ROOT / "models"), "--models", "cnn", "--default-model", "cnn", "--model-poll-s", "0",
         "--max-batch-delay-us", "300000", "--otlp-endpoint", f"http://127.0.0.1:{port}",
         "--otlp-service-name", "fmnist-traces-test"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={"RUST_LOG": "info", "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 60
        while "serving" not in (text := Path(log.name).read_text()).split("listening", 1)[-1]:
            if server.poll() is not None or time.monotonic() > deadline:
                fail(f"server did not start: {text}")
            time.sleep(0.05)
        addr = re.search(r"grpc=([0-9.:]+)", text).group(1)

        callers = {}  # trace id (hex) -> the caller's span id (hex)
        stub = pb_grpc.ClassifierStub(grpc.insecure_channel(addr))
        pending = []
        for call in range(2):
            trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
            callers[trace_id] = parent_id
            # Two test-set garments and a blank image: reasons accepted (2) and low_contrast (1).
            images = [pb.Image(raw=IMAGES[i * 784:(i + 1) * 784]) for i in (2 * call, 2 * call + 1)]
            images.append(pb.Image(raw=bytes(784)))
            metadata = [("traceparent", f"00-{trace_id}-{parent_id}-01")]
            pending.append(stub.Classify.future(pb.ClassifyRequest(images=images), metadata=metadata, timeout=10))
        answers = [p.result() for p in pending]
        for call, answer in enumerate(answers):
            got = [r.prediction.class_id for r in answer.results[:2]]
            if got != [LABELS[2 * call], LABELS[2 * call + 1]]:
                fail(f"call {call} answered {got}")
        version = answers[0].model_version

        # SIGTERM: the server drains and sends the spans it still holds before it exits.
        server.send_signal(signal.SIGTERM)
        if server.wait(timeout=30) != 0:
            fail(f"server exited {server.returncode}: {Path(log.name).read_text()}")
    finally:
        if server.poll() is None:
            server.kill()
        Path(log.name).unlink(missing_ok=True)
    collector.stop(grace=1)

    spans = receiver.spans
    by_id = {s.span_id.hex(): s for s in spans}
    names = sorted({s.name for s in spans})
    batches = [s for s in spans if s.name == "inference_batch"]
    for trace_id, parent_id in callers.items():
        rpcs = [s for s in spans if s.name == "rpc" and s.trace_id.hex() == trace_id]
        if len(rpcs) != 1:
            fail(f"trace {trace_id}: {len(rpcs)} rpc spans among {names}")
        rpc = rpcs[0]
        if rpc.parent_span_id.hex() != parent_id:
            fail(f"rpc span's parent is {rpc.parent_span_id.hex()}, the caller's span is {parent_id}")
        attrs = attributes(rpc)
        want = {"rpc": "Classify", "model": "cnn", "version": version, "images": 3,
                "images.accepted": 2, "images.low_contrast": 1}
        wrong = {k: (attrs.get(k), v) for k, v in want.items() if attrs.get(k) != v}
        if wrong:
            fail(f"rpc span attributes (got, want): {wrong}; all: {attrs}")
        children = {s.name: s for s in spans if s.parent_span_id == rpc.span_id}
        for name in ("preprocess", "queue_wait", "inference"):
            child = children.get(name)
            if child is None or child.trace_id.hex() != trace_id:
                fail(f"trace {trace_id}: no {name} span under rpc; its children: {sorted(children)}")
        linked = [b for b in batches if any(link.span_id == rpc.span_id and link.trace_id == rpc.trace_id
                                            for link in b.links)]
        if len(linked) != 1:
            fail(f"trace {trace_id}: {len(linked)} inference_batch spans link its rpc span")
        inference = children["inference"]
        if not any(link.span_id == linked[0].span_id for link in inference.links):
            fail("the call's inference span does not link its batch")
    shared = [b for b in batches if len(b.links) == 2]
    if not shared:
        fail(f"no batch served both calls: batches with {[len(b.links) for b in batches]} links")
    batch_attrs = attributes(shared[0])
    # 4: each call's blank image is rejected before inference, so only the garments reach the model.
    if batch_attrs.get("images") != 4 or batch_attrs.get("model") != "cnn":
        fail(f"inference_batch attributes: {batch_attrs}")
    services = {kv.value.string_value for r in receiver.resources for kv in r.attributes if kv.key == "service.name"}
    if services != {"fmnist-traces-test"}:
        fail(f"service.name {services}")
    ok(f"{len(spans)} spans ({', '.join(names)}): both calls continue their callers' traces, "
       "rpc -> preprocess, queue_wait, inference; one inference_batch of 4 images links both rpc spans")
    ok("rpc spans carry model, version, images and reason counts (images.accepted=2, images.low_contrast=1)")


if __name__ == "__main__":
    main()
