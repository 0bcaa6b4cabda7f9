#!/usr/bin/env bash
# make fresh-check: shows that every Python environment installs from its lock alone, as on a fresh machine.
# Each lock goes into a new venv of each Python this machine has (python3, the distribution's /usr/bin/python3,
# every pyenv version), made under a temporary directory with the pip that Python comes with and an empty pip
# cache, through scripts/install-lock.sh as the real targets do (--no-deps --require-hashes, then pip check).
# The ONNX Runtime download (scripts/fetch-ort.sh) is checked the same way, into a temporary directory.
#
# Each environment is used with one Python (marked *): a failure there fails the check. The other Pythons are
# reported so that moving to one of them is a known quantity, not a surprise; they do not fail it.
#   FRESH_ENVS     environments to check (default: all), e.g. FRESH_ENVS="tools oip"
#   FRESH_PYTHONS  interpreters to try (default: all found), e.g. FRESH_PYTHONS="/usr/bin/python3"
# Downloads everything once per (environment, Python): the training lock is about 4 GB. About 40 min on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."

# name|lock|the Python it is used with (python3, or pyenv:VERSION as bench/run.sh does for Triton)
ENVS=(
  "tools|requirements-tools.txt|python3"
  "oip|tests/requirements-oip.txt|python3"
  "training|training/requirements.txt|python3"
  "bench|bench/requirements.txt|python3"
  "bench-triton|bench/requirements-triton.txt|pyenv:3.12.1"
)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fresh-check.XXXXXX")
logs="$tmp/logs"
mkdir -p "$logs"
# Venvs and the cache go; the logs stay for a look at what failed.
trap 'find "$tmp" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +' EXIT
export PIP_CACHE_DIR="$tmp/pip-cache"

# The interpreter behind a command (pyenv's shims are scripts), or nothing.
interpreter() { "$1" -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null; }
pyenv_root=$( (command -v pyenv >/dev/null && pyenv root) || echo "${PYENV_ROOT:-$HOME/.pyenv}")
declare -A label=()
pythons=()
add_python() {  # add_python COMMAND: one row per interpreter, however many names it has
  local exe where
  exe=$(interpreter "$1") || return 0
  [ -n "$exe" ] && [ -z "${label[$exe]:-}" ] || return 0
  case "$exe" in
    "$(interpreter python3)") where="python3 on PATH" ;;
    "$pyenv_root"/*) where=pyenv ;;
    /usr/bin/*) where="the distribution's" ;;
    *) where=$exe ;;
  esac
  pythons+=("$exe")
  label[$exe]="$("$exe" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?') ($where)"
}
if [ -n "${FRESH_PYTHONS:-}" ]; then
  for p in $FRESH_PYTHONS; do add_python "$p"; done
else
  add_python python3
  [ -x /usr/bin/python3 ] && add_python /usr/bin/python3
  for v in $(ls "$pyenv_root/versions" 2>/dev/null | sort -V); do
    [ -x "$pyenv_root/versions/$v/bin/python" ] && add_python "$pyenv_root/versions/$v/bin/python"
  done
fi
[ ${#pythons[@]} -gt 0 ] || { echo "fresh-check: no Python found" >&2; exit 1; }

intended() {  # intended SPEC EXE: is EXE the Python that SPEC names?
  case "$1" in
    python3) [ "$(interpreter python3)" = "$2" ] ;;
    pyenv:*) [ "$(interpreter "$pyenv_root/versions/${1#pyenv:}/bin/python")" = "$2" ] ;;
  esac
}

first_error() {  # the line of a log that says why, shortened
  local line
  if grep -q -E 'BackendUnavailable|prepare_metadata_for_build|metadata-generation-failed' "$1"; then
    # A pinned version without a wheel for this Python: pip tried its sdist, without the build tools.
    line="building an sdist (no wheel for this Python): $(grep -E '^[A-Za-z.]*(Error|Exception):' "$1" | tail -n 1)"
  else
    line=$(grep -m 1 -E 'No matching distribution|Could not find a version|DO NOT MATCH|No module named|requires |has requirement|^ERROR: [^I]' "$1" \
      || tail -n 1 "$1")
  fi
  sed 's/^ *//; s/^ERROR: //; s/ (from versions:.*//; s/ (from -r .*//' <<<"$line" | cut -c 1-100
}

failed_intended=()
untried=()
join() { printf '%s; ' "$@" | sed 's/; $//'; }
row() { printf '%-13s %-34s %-8s %-5s %6s  %s\n' "$@"; }
echo "fresh-check: each lock into a fresh venv of each Python, with the pip it comes with (logs: $logs)"
row environment python pip result time "why (first error line)"
if [ -z "${FRESH_ENVS:-}" ] || [[ " $FRESH_ENVS " == *" ort "* ]]; then
  start=$SECONDS
  if ORT_DIR="$tmp/ort" bash scripts/fetch-ort.sh >"$logs/ort.log" 2>&1; then result=PASS why=""; else
    result=FAIL why=$(first_error "$logs/ort.log"); failed_intended+=("the ONNX Runtime download"); fi
  row ort "* (python3 -m pip download)" - "$result" "$((SECONDS - start)) s" "$why"
fi

for spec in "${ENVS[@]}"; do
  IFS='|' read -r name lock use <<<"$spec"
  if [ -n "${FRESH_ENVS:-}" ] && [[ " $FRESH_ENVS " != *" $name "* ]]; then continue; fi
  tried=false
  for exe in "${pythons[@]}"; do
    mark=" "; intended "$use" "$exe" && mark="*" && tried=true
    log="$logs/$name-$(basename "$exe")-${label[$exe]%% *}.log"
    start=$SECONDS
    if nice -n 10 bash scripts/install-lock.sh "$exe" "$tmp/venv" "$lock" >"$log" 2>&1; then
      result=PASS why=""
    else
      result=FAIL why=$(first_error "$log")
      [ "$mark" = "*" ] && failed_intended+=("$name on ${label[$exe]}")
    fi
    pip=$("$tmp/venv/bin/python" -m pip --version 2>/dev/null | awk '{print $2}')
    rm -rf "$tmp/venv"
    row "$name" "$mark ${label[$exe]}" "${pip:--}" "$result" "$((SECONDS - start)) s" "$why"
  done
  $tried || untried+=("$name ($use)")
done

echo "(* = the Python the environment is used with)"
if [ ${#failed_intended[@]} -gt 0 ]; then
  echo "fresh-check: FAILED where it counts: $(join "${failed_intended[@]}") (logs: $logs)" >&2
  exit 1
fi
if [ ${#untried[@]} -gt 0 ]; then
  echo "fresh-check: not tried on the Python it is used with (not found, or left out by FRESH_PYTHONS):" \
    "$(join "${untried[@]}")"
fi
echo "fresh-check: every environment tried on the Python it is used with installs from its lock alone"
