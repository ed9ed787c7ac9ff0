#!/usr/bin/env bash
# Install (the pinned stack, and the browser the MLflow UI test drives), check the import contract and run the whole test suite (fast tier + slow end-to-end tier). Fast tier: scripts/test.sh tests/unit; quick integration tier: scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/browser.sh
bash scripts/setup.sh
source scripts/env.sh
lint-imports --no-cache  # the import contract (.importlinter): layers, mlflow only in emm.tracking, prefect only in flows/, emm never imports harness/
exec python -m pytest "$@"
