#!/usr/bin/env bash
# Input drift and the capture, end to end (issue #38): tests/drift.py replays the test set and two mixed streams
# through the release server, checks with promtool that the shipped drift alerts stay quiet for the test set
# and fire for the mixed streams, and checks the capture's bound, rotation and format. Offline; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMTOOL=${PROMTOOL:-promtool}
command -v "$PROMTOOL" >/dev/null || { echo "FAIL: $PROMTOOL missing: run \`make test-deps\` (Debian package prometheus)"; exit 1; }
[ -x target/release/fmnist ] || { echo "FAIL: target/release/fmnist missing: make test builds it"; exit 1; }
python3 tests/drift.py "$PROMTOOL"
