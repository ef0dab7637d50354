#!/usr/bin/env bash
# Packages the test suite needs beyond `make run`: a headless browser for the report check
# (tests/unit/test_report_browser.py). Idempotent; call it before running the tests.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
chromium --version
