#!/usr/bin/env bash
# Puts the ONNX Runtime shared library the server loads (ort's load-dynamic) into .ort/.
# Source: the onnxruntime==1.31.1 wheel from PyPI (the only registry reachable here); no other download. The wheel
# must match the sha256 pinned below before anything is unpacked; it stays in .ort/ next to the library, so a
# later run re-checks it (a second or so) and tests/fetch_ort_test.sh has real bytes to corrupt offline.
#   ORT_DIR    where the wheel and the library go (default .ort)
#   ORT_WHEEL  a local wheel file to use instead of downloading one: checked against the same pin
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.31.1
# One wheel per machine architecture: CPython 3.11's, whatever the local Python is (we take the C library out of
# it, not the Python binding). The hashes are PyPI's for these files (its index lists them, and they are among
# onnxruntime's hashes in training/requirements.txt); a new VERSION needs new ones, from
#   pip download --no-deps --only-binary=:all: --platform PLATFORM --python-version 3.11 onnxruntime==VERSION
# then sha256sum, checked against the hash PyPI's index gives for that file.
case "$(uname -m)" in
  x86_64) PLATFORM=manylinux_2_28_x86_64 SHA256=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f ;;
  aarch64) PLATFORM=manylinux_2_28_aarch64 SHA256=da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3 ;;
  *) echo "fetch-ort: no onnxruntime $VERSION wheel is pinned for $(uname -m) (x86_64 and aarch64 are)" >&2; exit 1 ;;
esac
WHEEL_NAME="onnxruntime-$VERSION-cp311-cp311-$PLATFORM.whl"
DIR=${ORT_DIR:-.ort}
LIB="$DIR/libonnxruntime.so.$VERSION"
CACHED="$DIR/$WHEEL_NAME"

# verify FILE ADVICE: returns if FILE's sha256 is the pinned one; otherwise says so on stderr and exits 1.
verify() {
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$SHA256" ] && return 0
  cat >&2 <<EOF
fetch-ort: REFUSED $1: sha256 mismatch, nothing unpacked.
  expected $SHA256 (PyPI's $WHEEL_NAME)
  got      $got
$2
EOF
  exit 1
}

unpack() {
  mkdir -p "$DIR"
  python3 - "$1" "$LIB" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("capi/libonnxruntime.so." + out.rsplit(".so.", 1)[1]))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        dst.write(src.read())
PY
  mv "$LIB.part" "$LIB"
}

if [ -n "${ORT_WHEEL:-}" ]; then
  verify "$ORT_WHEEL" "  ORT_WHEEL names a file that is not that wheel: unset ORT_WHEEL to download it from PyPI."
  unpack "$ORT_WHEEL"
  [ "$(realpath "$ORT_WHEEL")" = "$(realpath -m "$CACHED")" ] || cp "$ORT_WHEEL" "$CACHED"
  echo "ONNX Runtime $VERSION ($ORT_WHEEL, sha256 checked) -> $LIB"
  exit 0
fi

if [ -f "$LIB" ] && [ -f "$CACHED" ]; then
  verify "$CACHED" "  The wheel kept in $DIR changed since it was checked, so $LIB cannot be trusted either:
  remove $DIR and run \`make ort\` to fetch and check it again."
  exit 0
fi

command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1 \
  || { echo "fetch-ort: python3 -m pip is missing: run scripts/setup-system.sh (it installs python3-pip)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# pip checks the hash too (--require-hashes), and the platform flags pick this one file whatever python3 is.
printf 'onnxruntime==%s --hash=sha256:%s\n' "$VERSION" "$SHA256" >"$tmp/requirement.txt"
echo "fetching $WHEEL_NAME from PyPI ..."
# pip retries each request itself; the loop covers a registry that is down for a few seconds.
for wait in 5 15 30 0; do
  python3 -m pip download --quiet --retries 10 --no-deps --only-binary=:all: --require-hashes \
    --platform "$PLATFORM" --python-version 3.11 --implementation cp --abi cp311 \
    -r "$tmp/requirement.txt" -d "$tmp" && break
  if [ "$wait" -eq 0 ]; then
    echo "fetch-ort: could not download $WHEEL_NAME (pip's message is above; if it reports a hash mismatch, PyPI" \
      "served other bytes than the pinned ones: do not work around it, find out why)" >&2
    exit 1
  fi
  echo "pip download failed, retrying in ${wait} s" >&2; sleep "$wait"
done
verify "$tmp/$WHEEL_NAME" "  PyPI served other bytes than the pinned ones: do not unpin; find out why before using them."
unpack "$tmp/$WHEEL_NAME"
mv "$tmp/$WHEEL_NAME" "$CACHED"
echo "ONNX Runtime $VERSION (sha256 checked) -> $LIB"
