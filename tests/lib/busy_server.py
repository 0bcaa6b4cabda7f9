"""A stand-in Classifier that always answers RESOURCE_EXHAUSTED, as the real server does when its queue is full
(hard to provoke on purpose), so tests/python_client.sh can check the client's retries and message. Uses the
stubs from clients/python/generate.sh. Prints its port, then serves until killed.

    python tests/lib/busy_server.py
"""
import sys
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "generated"))
import grpc  # noqa: E402
from fashion_mnist.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402


class Busy(pb_grpc.ClassifierServicer):
    calls = 0

    def Classify(self, request, context):
        Busy.calls += 1
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full (call {Busy.calls}): retry with backoff")


server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
pb_grpc.add_ClassifierServicer_to_server(Busy(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
