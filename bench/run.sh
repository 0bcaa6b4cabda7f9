#!/usr/bin/env bash
# make bench: builds what the benchmark runs, sets up the peers' virtual environments (bench/.venv, from the
# hashed lock bench/requirements.txt; bench/.venv-triton, from bench/requirements-triton.txt, both installed with
# --no-deps by scripts/install-lock.sh), then runs bench/run.py.
# Extra arguments go to run.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=bench/.venv
if [ ! -f "$VENV/.installed" ] || [ bench/requirements.txt -nt "$VENV/.installed" ] \
  || [ scripts/install-lock.sh -nt "$VENV/.installed" ]; then
  bash scripts/install-lock.sh python3 "$VENV" bench/requirements.txt
  touch "$VENV/.installed"
fi

# The Triton peer gets a venv of its own, from pyenv's Python 3.12.1: nvidia-pytriton 0.7.0's Python backend stub
# for 3.12 embeds libpython3.12 (the stub for 3.11 fails against Debian's 3.11 stdlib), and it needs numpy < 2.
# Where that Python is missing, the Triton row is skipped: run.py prints and records the reason written here.
# (`pyenv install 3.12.1` needs the internet, so it is not attempted.)
TRITON_VENV=bench/.venv-triton
triton_python() {
  local pyenv prefix
  pyenv=$(command -v pyenv || echo "${PYENV_ROOT:-$HOME/.pyenv}/bin/pyenv")
  [ -x "$pyenv" ] || { echo "pyenv not found (not on PATH, nor in ${PYENV_ROOT:-$HOME/.pyenv}/bin)"; return 1; }
  prefix=$("$pyenv" prefix 3.12.1 2>/dev/null) \
    || { echo "pyenv has no Python 3.12.1 (\`pyenv install 3.12.1\` builds it, with the internet)"; return 1; }
  [ -f "$prefix/lib/libpython3.12.so.1.0" ] \
    || { echo "pyenv's 3.12.1 has no lib/libpython3.12.so.1.0 (the Triton backend stub links against it)"; return 1; }
  echo "$prefix/bin/python3.12"
}
if [ ! -f "$TRITON_VENV/.installed" ] || [ bench/requirements-triton.txt -nt "$TRITON_VENV/.installed" ] \
  || [ scripts/install-lock.sh -nt "$TRITON_VENV/.installed" ]; then
  why=""
  if py=$(triton_python); then
    if bash scripts/install-lock.sh "$py" "$TRITON_VENV" bench/requirements-triton.txt; then
      rm -f "$TRITON_VENV/.unavailable"
      touch "$TRITON_VENV/.installed"
    else
      why="installing bench/requirements-triton.txt into $TRITON_VENV failed (pip's output is above)"
    fi
  else
    why=$py
  fi
  if [ -n "$why" ]; then
    mkdir -p "$TRITON_VENV"
    echo "$why" > "$TRITON_VENV/.unavailable"
    echo "bench/run.sh: the Triton peer will be skipped: $why" >&2
  fi
fi

cargo build --release --bin fmnist --example ceiling --example loadgen
exec "$VENV/bin/python" bench/run.py "$@"
