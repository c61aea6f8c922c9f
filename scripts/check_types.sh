#!/usr/bin/env bash
# Static type check of the whole tree with basedpyright (configuration: [tool.basedpyright] in pyproject.toml:
# pyright's "standard" mode everywhere, "strict" on each package's types.py). Exits non-zero on any error.
# Usage: bash scripts/check_types.sh [extra basedpyright args, e.g. a path]   (FIBER_VENV selects the venv, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FIBER_VENV:-.venv}
# --pythonpath: third-party imports resolve against this venv; fiber_* resolve to this checkout (extraPaths)
exec "$VENV/bin/basedpyright" --pythonpath "$VENV/bin/python" "$@"
