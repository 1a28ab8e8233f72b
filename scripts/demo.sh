#!/usr/bin/env bash
# The main job (README): set up if needed, then benchmark the Super1 sample shipped inside the
# package with the quick CPU profile. Results go to runs/demo (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/demo}
.venv/bin/matseg validate matseg/assets/profiles/sample.json
.venv/bin/matseg data matseg/assets/profiles/sample.json
.venv/bin/matseg bench matseg/assets/profiles/sample.json --out "$out" --rerun  # retrain jobs of an older spec (kept in $out/superseded)
