#!/usr/bin/env bash
# System packages the build and tests need on Debian/Ubuntu: protoc for the proto codegen, the Fashion-MNIST
# dataset for the full-test-set checks. Installs only what is missing.
set -euo pipefail
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
for extra in "$@"; do dpkg -s "$extra" >/dev/null 2>&1 || need+=("$extra"); done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# A mirror hiccup should cost a retry, not the run.
retry() { for wait in 5 15 30; do "$@" && return 0; echo "failed, retrying in ${wait} s: $*" >&2; sleep "$wait"; done; "$@"; }
export DEBIAN_FRONTEND=noninteractive
echo "installing ${need[*]} ..."
retry $SUDO apt-get update -qq
retry $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
