#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then start the standalone Merge app (http://127.0.0.1:7861).
set -euo pipefail
cd "$(dirname "$0")"
bash tools/venv.sh
exec .venv/bin/python -m lib_merge ui "$@"
