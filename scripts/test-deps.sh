#!/usr/bin/env bash
# Packages the test suite needs beyond `make run`: a headless browser for the report check
# (tests/unit/test_report_browser.py) and a PKCS#11 token for the signing-key tests
# (tests/unit/test_keys_softhsm.py: softhsm2-util and /usr/lib/softhsm/libsofthsm2.so).
# Idempotent; call it before running the tests.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
{ command -v softhsm2-util >/dev/null && [[ -f /usr/lib/softhsm/libsofthsm2.so ]]; } ||
  need+=(softhsm2)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
chromium --version
softhsm2-util --version
