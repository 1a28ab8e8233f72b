#!/usr/bin/env bash
# Create ./.venv if needed and install matseg (editable) with its dev tools, pinned by
# constraints.txt. Idempotent: a stamp of setup.py + constraints.txt + settings.ini skips
# the install when nothing changed. Needs only python3 (3.10+) and pip's package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "matseg setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.matseg-setup
want=$(cat setup.py constraints.txt settings.ini | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "matseg setup: installing pinned dependencies (first run: several minutes, torch is large)"
  .venv/bin/python -m pip install -q --upgrade "pip>=24"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,lite0,browser]"
  echo "$want" > "$stamp"
fi
