#!/usr/bin/env bash
# The browser page served on the gRPC port, driven by headless Chromium (Debian's chromium, through Playwright)
# against a real server: tests/web_test.py. Set SCREENSHOT=docs/web-page.png to refresh the README screenshot.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-tools/bin/python}
[ -x /usr/bin/chromium ] || { echo "FAIL: /usr/bin/chromium missing: run bash scripts/setup-system.sh chromium"; exit 1; }
source tests/lib/server.sh
start_server
"$PYTHON" tests/web_test.py
