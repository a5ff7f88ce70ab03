#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, then run every test (GPU/WebUI tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")"
bash tools/venv.sh
bash tools/browser.sh || true   # chromium for tests/test_browser.py (skipped when it cannot be installed)
exec .venv/bin/python -m pytest -q tests "$@"
