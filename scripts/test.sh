#!/usr/bin/env bash
# Install and run the whole test suite (fast tier + slow end-to-end tier). Fast tier only: scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec python -m pytest "$@"
