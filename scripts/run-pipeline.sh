#!/usr/bin/env bash
# The main job: install, fetch Census-Income (local mirror if present), run the full pipeline as a Prefect flow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
MIRROR=${EMM_MIRROR:-../shared/data}
if [ -d "$MIRROR/census-income" ]; then
  exec python -m flows.full_pipeline --dataset "${1:-census-income}" --mirror "$MIRROR"
else
  exec python -m flows.full_pipeline --dataset "${1:-census-income}"
fi
