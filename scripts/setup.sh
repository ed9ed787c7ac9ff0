#!/usr/bin/env bash
# Create .venv and install the pinned stack; does nothing when pyproject.toml and requirements.lock are unchanged.
# The test-only browser is installed by scripts/browser.sh (called by scripts/test.sh), never by the main job.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ "$(cat .venv/.install-stamp 2>/dev/null || true)" != "$stamp" ]; then
  echo "installing the pinned stack into .venv (first time: ~3 minutes)"
  # torch first, pinned: torch==2.13.0 is the CPU build; an unpinned torch pulls several GB of CUDA wheels.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[orchestration,baselines,dev]"
  echo "$stamp" > .venv/.install-stamp
fi
