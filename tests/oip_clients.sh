#!/usr/bin/env bash
# The Open Inference Protocol with clients nobody here wrote, against real servers:
#  - tritonclient (gRPC and HTTP, plaintext, TLS and mutual TLS) and the kserve SDK (tests/oip_clients.py), in their own virtual environment
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
# A server with model control on (docs/security.md), its key from the environment as a Secret would give it.
CONTROL_KEY=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
DEFAULT_ADDR=$GRPC_ADDR
export FMNIST_MODEL_CONTROL=explicit FMNIST_MODEL_CONTROL_KEY=$CONTROL_KEY
start_server
unset FMNIST_MODEL_CONTROL FMNIST_MODEL_CONTROL_KEY
CONTROL_ADDR=$GRPC_ADDR CONTROL_METRICS=$METRICS_ADDR CONTROL_LOG=$SERVER_LOG
GRPC_ADDR=$DEFAULT_ADDR
FMNIST_MODEL_CONTROL_KEY=$CONTROL_KEY "$VENV/bin/python" tests/oip_clients.py triton "$GRPC_ADDR" "$BUSY_ADDR" "$CONTROL_ADDR"
"$VENV/bin/python" tests/oip_clients.py kserve "$GRPC_ADDR"
# tritonclient over TLS and mutual TLS (clients/README.md "TLS"), with test certificates for localhost.
source tests/lib/tls.sh
CERTS=$(mktemp -d)
make_test_certs "$CERTS"
start_server --tls-cert "$CERTS/localhost.pem" --tls-key "$CERTS/localhost.key"
TLS_PORT=${GRPC_ADDR##*:}
start_server --tls-cert "$CERTS/localhost.pem" --tls-key "$CERTS/localhost.key" --tls-client-ca "$CERTS/ca.pem"
MTLS_PORT=${GRPC_ADDR##*:}
GRPC_ADDR=$DEFAULT_ADDR
"$VENV/bin/python" tests/oip_clients.py triton-tls "$GRPC_ADDR" "$TLS_PORT" "$MTLS_PORT" "$CERTS"
rm -rf "$CERTS"
# Preprocessing parity, on a server without the unsharp mask (the image crate's own; tests/preprocess_parity.py).
start_server --sharpen-sigma 0
PARITY_ADDR=$GRPC_ADDR
GRPC_ADDR=$DEFAULT_ADDR
"$VENV/bin/python" tests/preprocess_parity.py "$PARITY_ADDR"

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

# Model control with curl (docs/security.md): refused by default; with the key, a forced unload of the default
# model takes the server out of readiness until the model is loaded again.
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[ "$(code -X POST "$GRPC_ADDR/v2/repository/models/cnn/unload")" = 403 ] || fail "anonymous unload not refused"
[ "$(code "$GRPC_ADDR/v2/health/ready")" = 200 ] || fail "the default server is not ready after a refused unload"
auth=(-H "Authorization: Bearer $CONTROL_KEY")
[ "$(code -X POST "$CONTROL_ADDR/v2/repository/models/cnn/unload")" = 401 ] || fail "unload without the key"
[ "$(code -X POST "${auth[@]}" "$CONTROL_ADDR/v2/repository/models/cnn/unload")" = 409 ] || fail "the default model unloaded without force"
[ "$(code -X POST "${auth[@]}" -d '{"parameters":{"force":true}}' "$CONTROL_ADDR/v2/repository/models/cnn/unload")" = 200 ] || fail "forced unload with the key"
[ "$(code "$CONTROL_ADDR/v2/health/ready")" = 503 ] || fail "ready without the default model"
[ "$(code "$CONTROL_ADDR/v2/models/cnn/ready")" = 503 ] || fail "cnn ready once unloaded"
[ "$(code "$CONTROL_ADDR/v2/health/live")" = 200 ] || fail "not live"
[ "$(code -X POST "${auth[@]}" "$CONTROL_ADDR/v2/repository/models/cnn/load")" = 200 ] || fail "load with the key"
[ "$(code "$CONTROL_ADDR/v2/health/ready")" = 200 ] || fail "not ready once the default model is back"
refusals=$(curl -s "$CONTROL_METRICS/metrics" | awk '/^fmnist_model_control_refusals_total/{s+=$2} END{print s+0}')
[ "$refusals" -ge 4 ] || fail "refusals counted: $refusals"
grep -q "model control call refused" "$CONTROL_LOG" || fail "refusals not logged"
! grep -q "$CONTROL_KEY" "$CONTROL_LOG" || fail "the key is in the log"
pass "curl: model control refused by default (403), 401 without the key, 409 for the default model without force; a forced unload makes /v2/health/ready 503 until the model is loaded again; $refusals refusals counted, the key never logged"
