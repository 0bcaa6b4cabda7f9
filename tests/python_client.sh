#!/usr/bin/env bash
# The Python client example (clients/python/) end to end: stubs generated from proto/ by grpcio-tools, then
# classify.py against a real server (test-set PNGs, a blank image, JSON output, a bad request), an unreachable
# address, and a server whose queue is full.
set -euo pipefail
cd "$(dirname "$0")/.."
# The OIP clients' environment: the Python client's pins are its versions, so one interpreter runs both.
PYTHON=${PYTHON:-.venv-oip/bin/python}
fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "ok - $*"; }
classify() { "$PYTHON" clients/python/classify.py "$@"; }

PYTHON="$PYTHON" bash clients/python/generate.sh >/dev/null
# The documented pins are the tested ones, and the generated stubs live beside tritonclient and kserve in one
# interpreter (with grpcio-tools 1.85, whose code needs protobuf >= 7, importing them together failed).
"$PYTHON" - clients/python/requirements.txt <<'PY' || fail "clients/python/requirements.txt pins other versions than the tested ones, or lacks hashes"
import sys
from importlib.metadata import version
pins, hashes = 0, False
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line and not line.startswith("--hash="):
        name, pinned = line.rstrip(" \\").split("==")
        assert version(name) == pinned, f"{name}: pinned {pinned}, tested {version(name)}"
        pins += 1
    elif line:
        hashes = True
assert pins >= 3 and hashes, "a hashed lock: every package pinned with its sha256 (scripts/install-lock.sh)"
PY
# tritonclient and kserve cannot share one interpreter whatever this project does: both register
# inference.ServerLiveRequest in protobuf's default pool ("duplicate symbol"). So the stubs are imported with
# each of them in turn.
for other in "tritonclient.grpc, tritonclient.http" "kserve"; do
  "$PYTHON" -c "
import sys; sys.path.insert(0, 'clients/python/generated')
from fashion_mnist.v1 import classifier_pb2, classifier_pb2_grpc
import $other
" || fail "the generated stubs and $other do not import together"
done
pass "the generated stubs import beside tritonclient, and beside kserve, with the pinned versions"
[ -f clients/python/generated/fashion_mnist/v1/classifier_pb2_grpc.py ] || fail "generate.sh wrote no stubs"
pass "generate.sh generates the stubs from proto/"

# A port nobody listens on: bound by the kernel, then released.
free_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rc=0; err=$(classify --addr "127.0.0.1:$free_port" --timeout 5 tests/fixtures/png/trouser-2.png 2>&1 >/dev/null) || rc=$?
[ "$rc" -eq 3 ] || fail "unreachable server: exit $rc, want 3: $err"
[ "$(wc -l <<<"$err")" -eq 1 ] && grep -q "^error: cannot reach the server at 127.0.0.1:$free_port" <<<"$err" \
  || fail "unreachable server message: $err"
pass "an unreachable server exits 3 with one line: ${err:0:80}..."

# The busy stand-in lives only inside a subshell, so its EXIT trap cannot clash with start_server's.
# with_busy_server ARGS... -- CMD: runs CMD with BUSY_PORT set to a stand-in started with ARGS.
with_busy_server() (
  args=(); while [ "$1" != "--" ]; do args+=("$1"); shift; done; shift
  busy_out=$(mktemp)
  "$PYTHON" tests/lib/busy_server.py "${args[@]}" >"$busy_out" 2>&1 &
  busy_pid=$!
  trap 'kill $busy_pid 2>/dev/null; rm -f "$busy_out"' EXIT
  for _ in $(seq 1 100); do [ -s "$busy_out" ] && break; sleep 0.1; done
  BUSY_PORT=$(head -1 "$busy_out")
  [[ "$BUSY_PORT" =~ ^[0-9]+$ ]] || fail "busy server did not start: $(cat "$busy_out")"
  "$@"
)
always_busy() {
  rc=0; err=$(classify --addr "127.0.0.1:$BUSY_PORT" --retries 2 tests/fixtures/png/trouser-2.png 2>&1 >/dev/null) || rc=$?
  [ "$rc" -eq 5 ] || fail "busy server: exit $rc, want 5: $err"
  [ "$(grep -c '^server busy, retrying' <<<"$err")" -eq 2 ] || fail "busy server: want 2 retries: $err"
  grep -q '^error: the server is busy (RESOURCE_EXHAUSTED) after 3 attempts.*(call 3)' <<<"$err" \
    || fail "busy server message: $err"
}
with_busy_server -- always_busy
pass "RESOURCE_EXHAUSTED is retried with backoff, then exits 5 saying the server is busy"

busy_then_free() {
  rc=0; out=$(classify --addr "127.0.0.1:$BUSY_PORT" --retries 3 tests/fixtures/png/trouser-2.png 2>/tmp/busy-err.$$) || rc=$?
  err=$(cat /tmp/busy-err.$$); rm -f /tmp/busy-err.$$
  [ "$rc" -eq 0 ] || fail "busy, then free: exit $rc, want 0: $err"
  [ "$(grep -c '^server busy, retrying' <<<"$err")" -eq 2 ] || fail "busy, then free: want 2 retries: $err"
  grep -Eq '^tests/fixtures/png/trouser-2.png +Ankle boot +0\.9900 +yes +REASON_ACCEPTED ' <<<"$out" \
    || fail "busy, then free: the third call's answer is not printed: $out"
}
with_busy_server --free-after 2 -- busy_then_free
pass "a server busy for 2 calls, then free: the client retries twice and prints the third call's answer"

source tests/lib/server.sh
start_server

out=$(classify --addr "$GRPC_ADDR" tests/fixtures/png/ankle-boot-0.png tests/fixtures/png/trouser-2.png)
grep -Eq '^tests/fixtures/png/ankle-boot-0.png +Ankle boot +[01]\.[0-9]{4} +yes +REASON_ACCEPTED ' <<<"$out" \
  || fail "ankle boot row: $out"
grep -Eq '^tests/fixtures/png/trouser-2.png +Trouser +[01]\.[0-9]{4} +yes +REASON_ACCEPTED ' <<<"$out" \
  || fail "trouser row: $out"
pass "classifies ankle-boot-0.png and trouser-2.png correctly (table)"

blank=$(mktemp --suffix=.png)
"$PYTHON" - "$blank" <<'PY'
import struct, sys, zlib
def chunk(kind, data): return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
rows = b"".join(b"\x00" + bytes(28) for _ in range(28))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
                              + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
out=$(classify --addr "$GRPC_ADDR" --json tests/fixtures/png/ankle-boot-0.png "$blank")
rm -f "$blank"
"$PYTHON" - "$out" <<'PY' || fail "JSON output: $out"
import json, sys
boot, blank = (json.loads(line) for line in sys.argv[1].splitlines())
assert (boot["class"], boot["class_id"], boot["accepted"], boot["reason"]) == ("Ankle boot", 9, True, "REASON_ACCEPTED"), boot
assert 0.6 <= boot["probability"] <= 1 and boot["model"], boot
assert (blank["class"], blank["accepted"], blank["reason"]) == (None, False, "REASON_LOW_CONTRAST"), blank
assert "contrast" in blank["detail"], blank
PY
pass "--json: the ankle boot is accepted, a blank image is rejected as REASON_LOW_CONTRAST"

rc=0; err=$(classify --addr "$GRPC_ADDR" --model no-such-model tests/fixtures/png/trouser-2.png 2>&1 >/dev/null) || rc=$?
[ "$rc" -eq 4 ] || fail "unknown model: exit $rc, want 4: $err"
grep -q '^error: the server rejected the request (INVALID_ARGUMENT): .*no-such-model' <<<"$err" || fail "unknown model: $err"
pass "an unknown model exits 4 with the server's INVALID_ARGUMENT message"

rc=0; err=$(classify --addr "$GRPC_ADDR" tests/fixtures/png/no-such-file.png 2>&1 >/dev/null) || rc=$?
[ "$rc" -eq 1 ] && grep -q '^error: cannot read tests/fixtures/png/no-such-file.png' <<<"$err" || fail "missing file: $rc $err"
pass "a missing file exits 1 naming it"
# More files than the server takes per call: the client asks the server for its limit and splits (issue #40).
start_server --max-images-per-request 8 --max-queued-images-per-connection 8
files=(tests/fixtures/png/*.png tests/fixtures/png/*.png)
out=$(classify --addr "$GRPC_ADDR" --json "${files[@]}") || fail "${#files[@]} files against 8 per call: $out"
[ "$(grep -c '"accepted": true' <<<"$out")" -eq "${#files[@]}" ] || fail "${#files[@]} files against 8 per call: $out"
pass "${#files[@]} files against a server that takes 8 per call: split by the limit GetModelInfo reports"

# TLS and mutual TLS: a CA, a server certificate for localhost and a client certificate, made with openssl.
source tests/lib/tls.sh
tls=$(mktemp -d)
make_test_certs "$tls"
start_server --tls-cert "$tls/localhost.pem" --tls-key "$tls/localhost.key" --tls-client-ca "$tls/ca.pem"
grep -q 'tls="mutual' "$SERVER_LOG" || fail "the start-up log does not name the TLS mode: $(head -3 "$SERVER_LOG")"
tls_port=${GRPC_ADDR##*:}
out=$(classify --addr "localhost:$tls_port" --tls-ca "$tls/ca.pem" --tls-cert "$tls/client.pem" --tls-key "$tls/client.key" \
  --json tests/fixtures/png/ankle-boot-0.png)
grep -q '"class": "Ankle boot"\|"class":"Ankle boot"' <<<"$out" || fail "mutual TLS: $out"
pass "mutual TLS: classified with --tls-ca, --tls-cert and --tls-key; the start-up log says tls=mutual"
rc=0; err=$(classify --addr "localhost:$tls_port" --tls-ca "$tls/ca.pem" --timeout 5 tests/fixtures/png/trouser-2.png 2>&1 >/dev/null) || rc=$?
[ "$rc" -ne 0 ] && [ "$(wc -l <<<"$err")" -eq 1 ] || fail "mutual TLS without a client certificate: exit $rc: $err"
pass "mutual TLS without a client certificate: exit $rc, one line"
rm -rf "$tls"
echo "python client: all checks passed"
