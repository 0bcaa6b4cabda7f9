#!/usr/bin/env bash
# System packages the build and tests need on Debian/Ubuntu: protoc for the proto codegen, the Fashion-MNIST
# dataset for the full-test-set checks, Python's venv and pip for the installs. Installs only what is missing.
set -euo pipefail
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
# Every Python environment is `python3 -m venv` plus that venv's pip (scripts/install-lock.sh), and the ONNX
# Runtime wheel comes through `python3 -m pip download` (scripts/fetch-ort.sh). Debian's and Ubuntu's python3
# keeps venv (ensurepip) and pip in packages of their own; another python3 (pyenv's, a container's) brings both.
if ! python3=$(command -v python3); then
  need+=(python3 python3-venv python3-pip)
elif dpkg -S "$(realpath "$python3")" >/dev/null 2>&1; then
  for p in python3-venv python3-pip; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
elif ! python3 -c 'import ensurepip, venv' 2>/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
  echo "setup-system: $python3 ($(realpath "$python3")) is not the distribution's python3 and lacks venv," \
    "ensurepip or pip: install them for it, or put the distribution's python3 first on PATH" >&2
  exit 1
fi
# prometheus (tests/prometheus.sh runs its own, on ephemeral ports) gets an install of its own, below.
prometheus=false
for extra in "$@"; do
  dpkg -s "$extra" >/dev/null 2>&1 && continue
  if [ "$extra" = prometheus ]; then prometheus=true; else need+=("$extra"); fi
done
[ ${#need[@]} -eq 0 ] && ! $prometheus && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# A mirror hiccup should cost a retry, not the run.
retry() { for wait in 5 15 30; do "$@" && return 0; echo "failed, retrying in ${wait} s: $*" >&2; sleep "$wait"; done; "$@"; }
export DEBIAN_FRONTEND=noninteractive
retry $SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} ..."
  retry $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if $prometheus; then
  # The tests want only the prometheus and promtool binaries. The package starts a daemon on :9090 (the
  # service's default metrics port) through systemd or init.d, and recommends node-exporter (one more daemon on
  # :9100): install it without recommends, then stop and disable the daemon it started (none in a container
  # whose policy-rc.d forbids starting services).
  echo "installing prometheus (binaries only: its daemon is stopped and disabled) ..."
  retry $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
