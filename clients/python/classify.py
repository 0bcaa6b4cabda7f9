#!/usr/bin/env python3
"""Classify image files with the Fashion-MNIST gRPC service: an example client using stubs generated from proto/.

    bash clients/python/generate.sh          # once, and after the proto changes
    python3 clients/python/classify.py --addr localhost:50051 shoe.png shirt.jpg

Prints one row per file: class, probability, accepted, reason and the server's explanation (or JSON lines with
--json). A rejected image is a normal answer, not an error.

Exit status: 0 every file got an answer; 1 a file could not be read or the call failed otherwise; 2 bad usage;
3 the server is unreachable, unavailable or did not answer in time; 4 the server rejected the request
(INVALID_ARGUMENT: unknown model, bad threshold, too many images); 5 the server stayed busy
(RESOURCE_EXHAUSTED) through every retry.
"""

import argparse
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "generated"))
# gRPC's C core logs a failed TLS handshake in several lines of its own; the client says what failed in one.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
try:
    import grpc
    from fashion_mnist.v1 import classifier_pb2 as pb
    from fashion_mnist.v1 import classifier_pb2_grpc as pb_grpc
except ImportError as e:
    print(f"error: {e}: install grpcio and grpcio-tools (clients/python/requirements.txt) and run "
          "clients/python/generate.sh", file=sys.stderr)
    sys.exit(1)

EXIT_FAILED, EXIT_UNREACHABLE, EXIT_INVALID, EXIT_BUSY = 1, 3, 4, 5
# The server's default max_images_per_request: used only when the server does not answer GetModelInfo, which
# reports the one in force.
IMAGES_PER_CALL = 64
MAX_MESSAGE_BYTES = 64 << 20


class ClientError(Exception):
    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="image files (PNG, JPEG, ...; with --raw, 784-byte pixels)")
    p.add_argument("--addr", default=os.environ.get("FMNIST_ADDR", "localhost:50051"),
                   help="server host:port; several, comma-separated, or dns:///name:port (a headless Service) to "
                        "spread calls round-robin over the replicas (env FMNIST_ADDR; default %(default)s)")
    p.add_argument("--model", default="", help="model name; default: the server's default model")
    p.add_argument("--min-confidence", type=float, help="minimum confidence override for this call")
    p.add_argument("--raw", action="store_true", help="send the files as raw 28x28 pixels")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each call (default %(default)s)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries with exponential backoff while the server is busy (default %(default)s)")
    p.add_argument("--tls-ca", type=Path, default=os.environ.get("FMNIST_CLIENT_TLS_CA"),
                   help="PEM of the CA that signed the server's certificate: speak TLS (env FMNIST_CLIENT_TLS_CA)")
    p.add_argument("--tls-cert", type=Path, default=os.environ.get("FMNIST_CLIENT_TLS_CERT"),
                   help="PEM certificate chain to present for mutual TLS, with --tls-key (env FMNIST_CLIENT_TLS_CERT)")
    p.add_argument("--tls-key", type=Path, default=os.environ.get("FMNIST_CLIENT_TLS_KEY"),
                   help="PEM private key of --tls-cert (env FMNIST_CLIENT_TLS_KEY)")
    p.add_argument("--tls-domain", default=None,
                   help="the name the server's certificate must carry; default: the address's host")
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        p.error("--tls-cert needs --tls-ca: the client certificate is presented over TLS")
    return args


# Calls are spread per call, not per connection: grpc-core's round_robin keeps a connection to every address the
# target resolves to. A dns:/// target is resolved again whenever a connection ends, so when a replica sends
# GOAWAY (its --max-connection-age-s, or a drain) the client learns of replicas added since. UNAVAILABLE (a
# replica going away between resolution and the call) is retried on another replica: Classify has no side
# effects, so a retry can never apply a call twice.
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "fashion_mnist.v1.Classifier"}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})


def channel_target(addr: str) -> str:
    """The grpc-core target for `addr`: one host:port, a dns:/// name, or several host:port, comma-separated
    (each resolved once, here; grpc-core lists several addresses only as ipv4:/ipv6: literals)."""
    parts = [a.strip() for a in addr.split(",") if a.strip()]
    if len(parts) <= 1 or ":///" in addr:
        return addr
    resolved = []
    for part in parts:
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ClientError(f"{part!r} is not host:port", EXIT_FAILED)
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ClientError(f"cannot resolve {host}: {e.strerror}", EXIT_UNREACHABLE) from e
        resolved.extend(f"{info[4][0]}:{info[4][1]}" for info in infos)
    return "ipv4:" + ",".join(dict.fromkeys(resolved))


def tls_credentials(args) -> grpc.ChannelCredentials | None:
    """TLS with the given CA (and the client's own certificate for mutual TLS); None for plaintext."""
    if args.tls_ca is None:
        return None
    try:
        ca = args.tls_ca.read_bytes()
        cert = args.tls_cert.read_bytes() if args.tls_cert else None
        key = args.tls_key.read_bytes() if args.tls_key else None
    except OSError as e:
        raise ClientError(f"cannot read {e.filename}: {e.strerror}", EXIT_FAILED) from e
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(addr: str, extra_options=(), tls: grpc.ChannelCredentials | None = None,
                 tls_domain: str | None = None) -> grpc.Channel:
    """A channel that balances calls over every replica `addr` names (see SERVICE_CONFIG), over TLS when `tls`
    is given."""
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.service_config", SERVICE_CONFIG),
               *extra_options]
    target = channel_target(addr)
    if target.startswith("ipv4:"):
        # Else the :authority is the whole address list, which is no valid authority: servers reset the stream.
        options.append(("grpc.default_authority", addr.split(",")[0].strip()))
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls_domain:
        options.append(("grpc.ssl_target_name_override", tls_domain))
    elif addr.startswith("dns:///"):
        # The certificate names the Service, not the addresses it resolves to.
        options.append(("grpc.ssl_target_name_override", addr[len("dns:///"):].rsplit(":", 1)[0]))
    return grpc.secure_channel(target, tls, options=options)


def read_images(args):
    images = []
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ClientError(f"cannot read {path}: {e.strerror}", EXIT_FAILED) from e
        images.append(pb.Image(raw=data) if args.raw else pb.Image(encoded=data))
    return images


def call_error(e: grpc.RpcError, args, attempts: int) -> ClientError:
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(f"cannot reach the server at {args.addr} (unreachable or shutting down): {details}",
                           EXIT_UNREACHABLE)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"no answer from {args.addr} within {args.timeout:g} s", EXIT_UNREACHABLE)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ClientError(f"the server rejected the request (INVALID_ARGUMENT): {details}", EXIT_INVALID)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ClientError(f"the server is busy (RESOURCE_EXHAUSTED) after {attempts} attempts, try again later: "
                           f"{details}", EXIT_BUSY)
    return ClientError(f"classify failed ({code.name}): {details}", EXIT_FAILED)


def images_per_call(stub, args) -> int:
    """The most images one call may carry, as the server says (its --max-images-per-request)."""
    try:
        limit = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout).limits.max_images_per_request
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server that has only Classify
            return IMAGES_PER_CALL
        raise call_error(e, args, 1) from None
    return limit or IMAGES_PER_CALL


def classify(stub, request, args):
    """One Classify call, retried with jittered exponential backoff while the server says its queue is full."""
    for attempt in range(args.retries + 1):
        try:
            return stub.Classify(request, timeout=args.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == args.retries:
                raise call_error(e, args, attempt + 1) from None
            delay = 0.1 * 2 ** attempt * random.uniform(0.5, 1.5)
            print(f"server busy, retrying in {delay:.2f} s", file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def print_results(files, responses, as_json):
    rows = []
    for response in responses:
        for r in response.results:
            p = r.prediction if r.HasField("prediction") else None
            rows.append({
                "class_id": p.class_id if p else None,
                "class": p.class_name if p else None,
                "probability": round(p.probability, 6) if p else None,
                "accepted": r.accepted,
                "reason": pb.Reason.Name(r.reason),
                "detail": r.detail,
                "model": response.model,
                "model_version": response.model_version,
            })
    if as_json:
        for file, row in zip(files, rows):
            print(json.dumps({"file": str(file), **row}))
        return
    width = max(4, *(len(str(f)) for f in files))
    print(f"{'FILE':<{width}}  {'CLASS':<12}  {'PROBABILITY':>11}  {'ACCEPTED':<8}  {'REASON':<26}  DETAIL")
    for file, row in zip(files, rows):
        prob = "-" if row["probability"] is None else f"{row['probability']:.4f}"
        print(f"{str(file):<{width}}  {row['class'] or '-':<12}  {prob:>11}  {'yes' if row['accepted'] else 'no':<8}  "
              f"{row['reason']:<26}  {row['detail']}")


def main(argv=None):
    args = parse_args(argv)
    try:
        images = read_images(args)
        with open_channel(args.addr, tls=tls_credentials(args), tls_domain=args.tls_domain) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            responses = []
            per_call = images_per_call(stub, args)
            for start in range(0, len(images), per_call):
                request = pb.ClassifyRequest(images=images[start:start + per_call], model=args.model)
                if args.min_confidence is not None:
                    request.min_confidence = args.min_confidence
                responses.append(classify(stub, request, args))
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print_results(args.files, responses, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
