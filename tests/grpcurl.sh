#!/usr/bin/env bash
# The README's grpcurl calls, run with the real grpcurl binary against a real server: reflection (list,
# describe), health, model info and classifying a PNG from the test set.
set -euo pipefail
cd "$(dirname "$0")/.."
GRPCURL=${GRPCURL:-.venv-tools/bin/grpcurl}
source tests/lib/server.sh
start_server
fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "ok - $*"; }

out=$($GRPCURL -plaintext "$GRPC_ADDR" list)
grep -qx 'fashion_mnist.v1.Classifier' <<<"$out" || fail "list lacks the Classifier: $out"
grep -qx 'grpc.health.v1.Health' <<<"$out" || fail "list lacks Health: $out"
grep -qx 'inference.GRPCInferenceService' <<<"$out" || fail "list lacks the Open Inference Protocol: $out"
pass "list shows the Classifier, Health and GRPCInferenceService through reflection"

out=$($GRPCURL -plaintext "$GRPC_ADDR" describe fashion_mnist.v1.Classifier)
grep -q 'rpc Classify ( .fashion_mnist.v1.ClassifyRequest ) returns ( .fashion_mnist.v1.ClassifyResponse )' <<<"$out" \
  || fail "describe: $out"
pass "describe shows the Classify RPC"

out=$($GRPCURL -plaintext -d '{"service":"fashion_mnist.v1.Classifier"}' "$GRPC_ADDR" grpc.health.v1.Health/Check)
grep -q '"status": "SERVING"' <<<"$out" || fail "health: $out"
pass "health check says SERVING"

out=$($GRPCURL -plaintext "$GRPC_ADDR" fashion_mnist.v1.Classifier/GetModelInfo)
grep -q '"name": "Ankle boot"' <<<"$out" || fail "model info: $out"
pass "model info lists the classes"

for png in tests/fixtures/png/*.png; do
  out=$($GRPCURL -plaintext -d "{\"images\":[{\"encoded\":\"$(base64 -w0 "$png")\"}]}" "$GRPC_ADDR" fashion_mnist.v1.Classifier/Classify)
  want=$(basename "$png" | sed 's/-[0-9]*\.png$//')
  got=$(python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; print(r["prediction"]["className"], r.get("accepted", False))' <<<"$out")
  case "$want" in
    tshirt) name="T-shirt/top" ;; ankle-boot) name="Ankle boot" ;; *) name="${want^}" ;;
  esac
  [ "$got" = "$name True" ] || fail "$png classified as '$got', expected '$name True': $out"
done
pass "Classify with a PNG from the test set: all 10 fixture PNGs correct and accepted"

out=$($GRPCURL -plaintext -d '{"service":"inference.GRPCInferenceService"}' "$GRPC_ADDR" grpc.health.v1.Health/Check)
grep -q '"status": "SERVING"' <<<"$out" || fail "OIP health: $out"
# The README's Open Inference Protocol call: outputs come back as raw little-endian bytes (base64 in JSON).
out=$($GRPCURL -plaintext -d "{\"model_name\":\"cnn\",\"inputs\":[{\"name\":\"encoded\",\"datatype\":\"BYTES\",\"shape\":[1],
      \"contents\":{\"bytes_contents\":[\"$(base64 -w0 tests/fixtures/png/ankle-boot-0.png)\"]}}],
      \"outputs\":[{\"name\":\"class_id\"},{\"name\":\"reason\"}]}" \
      "$GRPC_ADDR" inference.GRPCInferenceService/ModelInfer)
got=$(python3 -c '
import base64, json, struct, sys
r = json.load(sys.stdin)
raw = [base64.b64decode(c) for c in r["rawOutputContents"]]
print(struct.unpack("<q", raw[0])[0], raw[1][4:].decode())' <<<"$out")
[ "$got" = "9 ACCEPTED" ] || fail "ModelInfer with a PNG: '$got': $out"
pass "the Open Inference Protocol over grpcurl: health SERVING, ModelInfer classifies a PNG (class 9, ACCEPTED)"

out=$($GRPCURL -plaintext -d '{"images":[]}' "$GRPC_ADDR" fashion_mnist.v1.Classifier/Classify 2>&1) && fail "empty request succeeded"
grep -q 'InvalidArgument' <<<"$out" || fail "empty request: $out"
pass "an empty request is InvalidArgument"
echo "grpcurl: all checks passed"
