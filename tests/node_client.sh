#!/usr/bin/env bash
# The Node.js client (clients/node/, @grpc/grpc-js from the npm registry, installed by `npm ci` from its
# lockfile with integrity hashes) against real servers: the test-set PNGs with the classes their names say,
# class 0 reported as 0 (proto3 leaves a default out of the wire), calls split by the server's own image limit,
# a bad request, an unreachable address, and TLS and mutual TLS (issue #40).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "ok - $*"; }
# `make test-deps` (node-client) installs the packages with `npm ci`, where the network is; this runs offline.
command -v node >/dev/null || fail "node missing: run \`make test-deps\`"
[ -d clients/node/node_modules/@grpc/grpc-js ] || fail "clients/node/node_modules missing: run \`make test-deps\`"
(cd clients/node && npm ls --offline --all >/dev/null 2>&1) || fail "clients/node/node_modules differs from package-lock.json: run \`make test-deps\`"
pass "@grpc/grpc-js and @grpc/proto-loader installed as clients/node/package-lock.json pins them"
classify() { node clients/node/classify.js "$@"; }

source tests/lib/server.sh
start_server
files=(tests/fixtures/png/*.png)
out=$(classify --addr "$GRPC_ADDR" --json "${files[@]}")
[ "$(wc -l <<<"$out")" -eq "${#files[@]}" ] || fail "expected ${#files[@]} answers: $out"
node -e '
  const names = {"tshirt":0,"trouser":1,"pullover":2,"dress":3,"coat":4,"sandal":5,"shirt":6,"sneaker":7,"bag":8,"ankle-boot":9};
  const rows = require("fs").readFileSync(0, "utf8").trim().split("\n").map(JSON.parse);
  for (const r of rows) {
    const want = names[require("path").basename(r.file).replace(/-\d+\.png$/, "")];
    if (r.classId !== want) { console.error(`${r.file}: class ${r.classId}, want ${want}`); process.exit(1); }
    if (typeof r.classId !== "number" || typeof r.accepted !== "boolean") { console.error(JSON.stringify(r)); process.exit(1); }
  }' <<<"$out" || fail "wrong classes: $out"
pass "classified ${#files[@]} test-set PNGs with the classes their names say (class 0 comes back as 0)"
table=$(classify --addr "$GRPC_ADDR" tests/fixtures/png/ankle-boot-0.png)
grep -q "^FILE .*DETAIL$" <<<"$table" && grep -q "Ankle boot" <<<"$table" || fail "table: $table"
pass "a table with the server's DETAIL column"
rc=0; err=$(classify --addr "$GRPC_ADDR" --model shoes tests/fixtures/png/trouser-2.png 2>&1 >/dev/null) || rc=$?
[ "$rc" -eq 4 ] && grep -q 'unknown model "shoes"' <<<"$err" || fail "unknown model: exit $rc: $err"
pass "an unknown model: exit 4 with the server's message"
rc=0; err=$(classify --addr 127.0.0.1:1 --timeout 3 tests/fixtures/png/trouser-2.png 2>&1 >/dev/null) || rc=$?
[ "$rc" -eq 3 ] || fail "unreachable: exit $rc: $err"
pass "an unreachable server: exit 3"

start_server --max-images-per-request 4
out=$(classify --addr "$GRPC_ADDR" --json "${files[@]}")
[ "$(wc -l <<<"$out")" -eq "${#files[@]}" ] || fail "split calls: $out"
pass "${#files[@]} files to a server taking 4 images a call: split by GetModelInfo's limit, every file answered"

source tests/lib/tls.sh
tls=$(mktemp -d)
make_test_certs "$tls"
start_server --tls-cert "$tls/localhost.pem" --tls-key "$tls/localhost.key"
out=$(classify --addr "localhost:${GRPC_ADDR##*:}" --tls-ca "$tls/ca.pem" --json tests/fixtures/png/ankle-boot-0.png)
grep -q '"classId":9' <<<"$out" || fail "TLS: $out"
pass "TLS: classified with --tls-ca"
# deploy/overlays/tls probes with HTTPS GETs over HTTP/1.1, as the kubelet sends them, without checking the
# certificate.
for route in ready live; do
  code=$(curl -sk --http1.1 -o /dev/null -w '%{http_code}' "https://localhost:${GRPC_ADDR##*:}/v2/health/$route")
  [ "$code" = 200 ] || fail "the TLS overlay's $route probe: HTTP $code"
done
pass "deploy/overlays/tls's probes: HTTPS GET /v2/health/ready and /live over HTTP/1.1 answer 200"
start_server --tls-cert "$tls/localhost.pem" --tls-key "$tls/localhost.key" --tls-client-ca "$tls/ca.pem"
port=${GRPC_ADDR##*:}
out=$(FMNIST_CLIENT_TLS_CA="$tls/ca.pem" FMNIST_CLIENT_TLS_CERT="$tls/client.pem" FMNIST_CLIENT_TLS_KEY="$tls/client.key" \
  classify --addr "localhost:$port" --json tests/fixtures/png/ankle-boot-0.png)
grep -q '"classId":9' <<<"$out" || fail "mutual TLS: $out"
rc=0; err=$(classify --addr "localhost:$port" --tls-ca "$tls/ca.pem" --timeout 5 tests/fixtures/png/trouser-2.png 2>&1 >/dev/null) || rc=$?
[ "$rc" -ne 0 ] || fail "mutual TLS without a client certificate was served"
pass "mutual TLS: classified with the FMNIST_CLIENT_TLS_* variables; refused without a client certificate (exit $rc)"
rm -rf "$tls"
