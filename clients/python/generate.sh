#!/usr/bin/env bash
# Generates the Python gRPC stubs from proto/ into clients/python/generated/ (git-ignored: never edit or commit
# them, rerun this after the proto changes). Needs grpcio-tools: PYTHON=path/to/venv/bin/python to pick one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
proto=$(cd "$here/../../proto" && pwd)
PYTHON=${PYTHON:-python3}
out="$here/generated"
"$PYTHON" -c 'import grpc_tools' 2>/dev/null \
  || { echo "grpcio-tools missing for $PYTHON: pip install -r clients/python/requirements.txt" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
"$PYTHON" -m grpc_tools.protoc -I "$proto" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$proto/fashion_mnist/v1/classifier.proto"
echo "generated $(cd "$out" && find . -name '*.py' | sort | tr '\n' ' ')"
