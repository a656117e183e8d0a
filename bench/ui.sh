#!/usr/bin/env bash
# bench/ui.sh — the dashboard under load, in Debian's headless Chromium:
# time to first full render and tab memory for a 1,000-task run and a
# 1,000,000-line log (figures for docs/BENCHMARKS.md; nothing is asserted).
#
#   bench/ui.sh                 TASKS=1000 LINES=1000000 by default
#   STRATA_CI_BIN=path bench/ui.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"
ensure_packages chromium
release_ci_bin
if [[ ! -f ui/node_modules/.package-lock.json ]]; then
    (cd ui && npm ci --no-audit --no-fund)
fi
log "chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'), ci $CI_BIN"
cd ui && STRATA_CI_BIN="$CI_BIN" node tests/bench.mjs
