#!/usr/bin/env bash
# OpenTelemetry traces: the release server exports to an OTLP receiver in tests/traces.py (what it checks is
# written there). Runs in .venv-oip, which has grpcio and opentelemetry-proto with protobuf < 7.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-oip
[ -f "$VENV/.installed" ] || { echo "FAIL: $VENV missing: run \`make oip-venv\` (make test does)"; exit 1; }
STUBS=$(mktemp -d)
trap 'rm -rf "$STUBS"' EXIT
"$VENV/bin/python" -m grpc_tools.protoc -I proto --python_out="$STUBS" --grpc_python_out="$STUBS" \
  proto/fashion_mnist/v1/classifier.proto
PYTHONPATH=$STUBS "$VENV/bin/python" tests/traces.py
