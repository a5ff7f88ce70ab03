#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, then run every test (GPU/WebUI tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")"
bash tools/venv.sh
exec .venv/bin/python -m pytest -q tests "$@"
