#!/usr/bin/env bash
# The Open Inference Protocol with clients nobody here wrote, against real servers:
#  - tritonclient (gRPC and HTTP) and the kserve SDK (tests/oip_clients.py), in their own virtual environment
#    (.venv-oip, `make oip-venv` from the hashed tests/requirements-oip.txt: they need protobuf < 7);
#  - the README's curl example, run as written;
#  - deploy/kserve/ loaded into the kserve SDK's model classes (deploy/kserve_check.py);
#  - preprocessing parity with an independent Pillow/numpy reference (tests/preprocess_parity.py), which needs
#    the same environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-oip
fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "ok - $*"; }

[ -f "$VENV/.installed" ] || fail "$VENV missing: run \`make oip-venv\` (make test does)"
# Classify's stubs, only for the reference answers, generated with this environment's protobuf (< 7).
STUBS=$(mktemp -d)
"$VENV/bin/python" -m grpc_tools.protoc -I proto --python_out="$STUBS" --grpc_python_out="$STUBS" \
  proto/fashion_mnist/v1/classifier.proto
export PYTHONPATH=$STUBS

"$VENV/bin/python" deploy/kserve_check.py deploy/kserve/servingruntime.yaml deploy/kserve/inferenceservice.yaml

source tests/lib/server.sh
# A server whose queue holds one call of 64 images and refuses at once when it is full, for RESOURCE_EXHAUSTED.
start_server --max-queued-images 64 --max-queue-wait-ms 0 --max-batch-size 8
BUSY_ADDR=$GRPC_ADDR
start_server
"$VENV/bin/python" tests/oip_clients.py triton "$GRPC_ADDR" "$BUSY_ADDR"
"$VENV/bin/python" tests/oip_clients.py kserve "$GRPC_ADDR"
"$VENV/bin/python" tests/preprocess_parity.py "$GRPC_ADDR"

# README "Open Inference Protocol": the curl call between the markers, with the server's real address.
example=$(sed -n '/<!-- curl-example -->/,/<!-- \/curl-example -->/p' README.md | sed '/^```/d;/<!--/d')
[ -n "$example" ] || fail "README has no curl example between <!-- curl-example --> markers"
out=$(bash -c "${example//localhost:50051/$GRPC_ADDR}")
python3 - "$out" <<'PY' || fail "README curl example: $out"
import json, sys
r = json.loads(sys.argv[1])
outputs = {o["name"]: o["data"] for o in r["outputs"]}
assert outputs["class_id"] == [9] and outputs["reason"] == ["ACCEPTED"], outputs
PY
pass "README curl example classifies ankle-boot-0.png as class 9, ACCEPTED"
