#!/usr/bin/env bash
# Test-only: Debian's Chromium (once) for the MLflow UI end-to-end test, driven by Playwright from the dev extra.
# scripts/test.sh calls it; the main job (scripts/run-pipeline.sh) does not need a browser.
set -euo pipefail

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

