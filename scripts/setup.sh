#!/usr/bin/env bash
# Create .venv and install the pinned stack; does nothing when pyproject.toml and requirements.lock are unchanged.
# Also installs Debian's Chromium (once) for the MLflow UI end-to-end test, driven by Playwright from the dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."

# Browser for tests/integration/test_mlflow_ui_promote.py. Playwright cannot download its own browser offline,
# so it drives the system one: /usr/bin/chromium, or EMM_CHROMIUM=PATH. Without apt-get (as root) nothing is
# installed here and that test fails saying so.
chromium=${EMM_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  if [ "$chromium" = /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the MLflow UI test (first time: ~1-3 minutes)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; then
      echo "warning: apt-get could not install chromium: the MLflow UI test will fail" >&2
    fi
  else
    echo "warning: no Chromium at $chromium (installed here only as Debian's /usr/bin/chromium, by apt-get as root):" \
      "the MLflow UI test will fail" >&2
  fi
fi

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
