#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run Merge Lab standalone on its built-in defaults.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/venv.sh
exec .venv/bin/python -m lib_merge demo "$@"
