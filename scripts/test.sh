#!/usr/bin/env bash
# The project's test command: lint, type check, packaging checks, the docs build, then the test suite (CPU, offline).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FIBER_VENV:-.venv}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== ruff"
"$VENV/bin/ruff" check packages tests benchmarks scripts
"$VENV/bin/ruff" format --check packages tests benchmarks scripts
echo "== types: basedpyright (standard mode; strict on each package's types.py)"
FIBER_VENV="$VENV" bash scripts/check_types.sh
echo "== packaging: every package installs and imports alone with its declared dependencies"
"$VENV/bin/python" scripts/check_packaging.py
echo "== docs: mkdocs build --strict (broken links, nav entries or API references fail)"
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --quiet --site-dir build/site
echo "== pytest"
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$rc"
