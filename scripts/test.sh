#!/usr/bin/env bash
# Run test tiers: unit under `unshare -n` (no network), then the tiers with real
# components. A tier that collects no tests fails (pytest exit 5 is an error).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTEST=.venv/bin/pytest
# a native abort at interpreter shutdown prints the Python stacks (one was seen after the kwok tier)
export PYTHONFAULTHANDLER=1
tiers=("$@")
((${#tiers[@]})) || tiers=(unit docker k8s kwok)
status=0
for tier in "${tiers[@]}"; do
  echo "=== tier: $tier ==="
  if [ "$tier" = unit ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
    unshare -n "$PYTEST" -m unit -q tests || status=1
  else
    "$PYTEST" -m "$tier" -q tests || status=1
  fi
done
exit $status
