"""A stand-in Classifier that answers RESOURCE_EXHAUSTED, as the real server does when its queue is full (hard to
provoke on purpose, and harder to end on cue), so tests/python_client.sh can check the client's retries and
messages. With --free-after N it refuses N calls, then answers every image as an accepted Ankle boot (a canned
answer: the client's retry loop is under test, not classification). Uses the stubs from
clients/python/generate.sh. Prints its port, then serves until killed.

    python tests/lib/busy_server.py [--free-after N]
"""
import argparse
import sys
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "generated"))
import grpc  # noqa: E402
from fashion_mnist.v1 import classifier_pb2 as pb  # noqa: E402
from fashion_mnist.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--free-after", type=int, default=None, help="refuse this many calls, then answer")
FREE_AFTER = parser.parse_args().free_after


class Busy(pb_grpc.ClassifierServicer):
    calls = 0

    def Classify(self, request, context):
        Busy.calls += 1
        if FREE_AFTER is None or Busy.calls <= FREE_AFTER:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full (call {Busy.calls}): retry with backoff")
        boot = pb.Prediction(class_id=9, class_name="Ankle boot", probability=0.99,
                             probabilities=[0.0] * 9 + [0.99], ood_score=-10.0)
        result = pb.Classification(prediction=boot, accepted=True, reason=pb.REASON_ACCEPTED,
                                   detail=f"stand-in answer on call {Busy.calls}")
        return pb.ClassifyResponse(results=[result] * len(request.images), model="stand-in")


server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
pb_grpc.add_ClassifierServicer_to_server(Busy(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
