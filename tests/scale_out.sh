#!/usr/bin/env bash
# Replicas on loopback under real grpcio load: spread through a per-connection balancer with connection ages,
# per-call balancing, and a drain with no failed call (tests/scale_out.py says what each check means).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-tools/bin/python}
PYTHON="$PYTHON" bash clients/python/generate.sh >/dev/null
exec "$PYTHON" tests/scale_out.py
