#!/usr/bin/env bash
# scripts/fetch-ort.sh takes the ONNX Runtime library only out of the wheel whose sha256 it pins: a wheel with one
# byte changed is refused before anything is unpacked, given directly (ORT_WHEEL) or found in the cache; the real
# wheel is accepted and gives the library .ort/ has. Offline (make test runs without a network): it works on the
# verified wheel that `make ort` keeps in .ort/. About a second.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "FAIL: $*" >&2; exit 1; }
LIB_NAME=libonnxruntime.so.1.31.1
wheel=$(ls .ort/onnxruntime-1.31.1-*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] && [ -f ".ort/$LIB_NAME" ] \
  || fail "no checked onnxruntime wheel and library in .ort/: run \`make ort\` (make test-deps does)"
good=$(sha256sum "$wheel" | cut -d' ' -f1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# One byte in the middle of the wheel, inverted.
cp "$wheel" "$tmp/corrupted.whl"
python3 - "$tmp/corrupted.whl" <<'PY'
import os, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(os.path.getsize(sys.argv[1]) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0xFF]))
PY
bad=$(sha256sum "$tmp/corrupted.whl" | cut -d' ' -f1)

# refused LOG: the script failed, and said why with both hashes.
refused() {
  grep -q "REFUSED .*sha256 mismatch, nothing unpacked" "$1" || fail "no refusal message: $(cat "$1")"
  grep -q "expected $good" "$1" || fail "the message does not give the pinned sha256: $(cat "$1")"
  grep -q "got      $bad" "$1" || fail "the message does not give the corrupted file's sha256: $(cat "$1")"
}

# A corrupted wheel given directly.
if ORT_DIR="$tmp/direct" ORT_WHEEL="$tmp/corrupted.whl" bash scripts/fetch-ort.sh >"$tmp/direct.log" 2>&1; then
  fail "fetch-ort.sh accepted a corrupted wheel (ORT_WHEEL): $(cat "$tmp/direct.log")"
fi
refused "$tmp/direct.log"
[ ! -e "$tmp/direct/$LIB_NAME" ] || fail "a library was unpacked from the corrupted wheel"

# A corrupted wheel in the cache, next to a library: the run that would skip the download refuses too.
mkdir "$tmp/cached"
cp "$tmp/corrupted.whl" "$tmp/cached/$(basename "$wheel")"
: >"$tmp/cached/$LIB_NAME"
if ORT_DIR="$tmp/cached" bash scripts/fetch-ort.sh >"$tmp/cached.log" 2>&1; then
  fail "fetch-ort.sh accepted a corrupted cached wheel: $(cat "$tmp/cached.log")"
fi
refused "$tmp/cached.log"
grep -q "run \`make ort\`" "$tmp/cached.log" || fail "the message does not say what to do: $(cat "$tmp/cached.log")"

# The real wheel: accepted, and the library is the one .ort/ has.
ORT_DIR="$tmp/real" ORT_WHEEL="$wheel" bash scripts/fetch-ort.sh >"$tmp/real.log" 2>&1 \
  || fail "fetch-ort.sh refused the real wheel: $(cat "$tmp/real.log")"
cmp -s "$tmp/real/$LIB_NAME" ".ort/$LIB_NAME" || fail "the library from the real wheel differs from .ort/$LIB_NAME"

echo "fetch-ort: a corrupted wheel is refused (given and cached) with both sha256s; the real one gives .ort's library"
