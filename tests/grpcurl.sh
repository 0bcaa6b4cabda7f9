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
pass "list shows the Classifier and Health services through reflection"

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

out=$($GRPCURL -plaintext -d '{"images":[]}' "$GRPC_ADDR" fashion_mnist.v1.Classifier/Classify 2>&1) && fail "empty request succeeded"
grep -q 'InvalidArgument' <<<"$out" || fail "empty request: $out"
pass "an empty request is InvalidArgument"
echo "grpcurl: all checks passed"
