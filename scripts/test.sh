#!/usr/bin/env bash
# The one test command (README, .ci/run): set up if needed, then prove that
#   1. matseg/ is exactly nbdev_export of nbs/      2. notebooks are clean (nbdev_clean)
#   3. notebooks lint clean and every module imports  4. every notebook runs (nbdev_test)
#   5. pytest (CLI, integration, real data, browser)
# Extra flags for nbdev_test (e.g. "slow gpu") come from MATSEG_TEST_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser_setup.sh   # Debian chromium for the real-browser test (apt, as root)
export PATH="$PWD/.venv/bin:$PATH"
export MPLBACKEND=Agg PYTHONHASHSEED=0
# one BLAS/torch thread per process: nbdev_test runs 2 notebooks at once (and papermill kernels inside them)
# on 2 cores; more threads oversubscribe the machine and run several times slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

echo "== 1/5 matseg/ equals nbdev_export of nbs/"
cp -r matseg "$tmp/lib_before"
nbdev_export
if ! diff -r -q -x __pycache__ -x assets "$tmp/lib_before" matseg; then
  echo "FAIL: matseg/ differs from nbdev_export of nbs/ (edit the notebooks, not matseg/*.py; then run nbdev_export)"
  exit 1
fi

echo "== 2/5 notebooks are clean (nbdev_clean)"
cp -r nbs "$tmp/nbs_before"
nbdev_clean
if ! diff -r -q -x .ipynb_checkpoints "$tmp/nbs_before" nbs; then
  echo "FAIL: notebooks were not clean; nbdev_clean just cleaned them: review and commit"
  exit 1
fi

echo "== 3/5 lint notebooks and library; import every module"
ruff check nbs matseg tests bench
python - <<'PY'
import importlib, pkgutil, matseg
mods = [m.name for m in pkgutil.iter_modules(matseg.__path__, "matseg.")]
for m in mods: importlib.import_module(m)
print(f"imported {len(mods)} modules: {', '.join(mods)}")
PY

echo "== 4/5 notebooks run (nbdev_test${MATSEG_TEST_FLAGS:+ --flags $MATSEG_TEST_FLAGS})"
nbdev_test --n_workers 2 --timing ${MATSEG_TEST_FLAGS:+--flags "$MATSEG_TEST_FLAGS"}

echo "== 5/5 pytest"
python -m pytest -q -p no:cacheprovider "$@"
