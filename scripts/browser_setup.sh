#!/usr/bin/env bash
# Set up the real-browser tests: Debian's chromium + chromium-driver (apt, as root; no sudo) and
# Python playwright + jupyterlab (+ kaleido for PNG export) pinned by constraints.txt.
# Idempotent; never runs `playwright install` (we drive /usr/bin/chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "browser setup: chromium is missing and we are not root; install 'chromium chromium-driver' with apt" >&2
    exit 1
  fi
  echo "browser setup: installing Debian chromium + chromium-driver"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
PY=.venv/bin/python
if ! "$PY" -c "import playwright, jupyterlab, kaleido" 2>/dev/null; then
  echo "browser setup: installing playwright, jupyterlab, kaleido (pinned by constraints.txt)"
  "$PY" -m pip install -q -c constraints.txt playwright jupyterlab kaleido
fi
chromium --version
"$PY" - <<'PY'
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("playwright", "jupyterlab", "kaleido")))
PY
