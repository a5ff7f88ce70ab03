#!/usr/bin/env bash
# Create or update .venv with the pinned environment from requirements.txt (pin set B: the A1111 WebUI's
# gradio 3.41.2 stack, torch 2.14.1 + torchvision 0.29.1, ImageReward) and the `merge-lab` command. Re-installs
# only when requirements.txt or pyproject.toml changed since the last successful install. Sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Setting up .venv from requirements.txt (a few minutes the first time)..." >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -r requirements.txt >&2
  # the `merge-lab` command (pyproject.toml), linked to this checkout: nothing new is downloaded
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >&2
  echo "$want" > "$stamp"
fi
