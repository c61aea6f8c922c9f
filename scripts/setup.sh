#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with the exact pins of constraints.txt.
# Idempotent: a second run with unchanged pins and package metadata does nothing.
# Usage: bash scripts/setup.sh            (venv in .venv; set FIBER_VENV to use another path)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FIBER_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp=$(cat constraints.txt requirements-dev.txt packages/*/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.setup-stamp" 2>/dev/null || true)" = "$stamp" ]; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24" setuptools
# torch/torchvision first and alone: pip takes the wheels from this machine's local index when it has them.
echo "[setup] installing torch and torchvision (pinned)"
"${PIP[@]}" install -q -c constraints.txt torch torchvision
echo "[setup] installing the six packages (editable) with their extras and the dev tools"
"${PIP[@]}" install -q -c constraints.txt \
  -e "packages/fiber-backbones[hf,timm]" \
  -e "packages/fiber-heads" \
  -e "packages/fiber-data[hf,arrow,progress,webdataset,torchvision]" \
  -e "packages/fiber-eval[all]" \
  -e "packages/fiber-models" \
  -e "packages/fiber-train[plot,tensorboard]" \
  -r requirements-dev.txt
echo "$stamp" > "$VENV/.setup-stamp"
echo "[setup] done: activate with 'source $VENV/bin/activate'"
