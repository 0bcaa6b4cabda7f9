#!/usr/bin/env bash
# make bench: builds what the benchmark runs, sets up the peers' virtual environment (bench/.venv, from the
# pinned bench/requirements.txt), then runs bench/run.py. Extra arguments go to run.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=bench/.venv
if [ ! -f "$VENV/.installed" ] || [ bench/requirements.txt -nt "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r bench/requirements.txt
  touch "$VENV/.installed"
fi

cargo build --release --bin fmnist --example ceiling --example loadgen
exec "$VENV/bin/python" bench/run.py "$@"
