#!/usr/bin/env bash
# Puts the ONNX Runtime shared library the server loads (ort's load-dynamic) into .ort/.
# Source: the onnxruntime==1.31.1 wheel from PyPI (the only registry reachable here); no other download.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.31.1
LIB=".ort/libonnxruntime.so.$VERSION"
if [ -f "$LIB" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching onnxruntime==$VERSION from PyPI ..."
# pip retries each request itself; the loop covers a registry that is down for a few seconds.
for wait in 5 15 30 0; do
  python3 -m pip download --quiet --retries 10 --no-deps --only-binary=:all: "onnxruntime==$VERSION" -d "$tmp" && break
  [ "$wait" -gt 0 ] || exit 1
  echo "pip download failed, retrying in ${wait} s" >&2; sleep "$wait"
done
wheel=$(ls "$tmp"/onnxruntime-"$VERSION"-*.whl)
mkdir -p .ort
python3 - "$wheel" "$LIB" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("capi/libonnxruntime.so." + out.rsplit(".so.", 1)[1]))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        dst.write(src.read())
PY
mv "$LIB.part" "$LIB"
echo "ONNX Runtime $VERSION -> $LIB"
