#!/usr/bin/env bash
# bench/noop.sh — what an unchanged workspace costs: a no-op `ci build` over a
# local_source of a 100,000-file tree, against git's no-ops on the same tree.
#
#   bench/noop.sh [--files N] [--total-mib M] [--runs R] [--seed S] [--keep]
#
# Defaults: --files 100000 --total-mib 400 --runs 7 --seed 2.
#
# Generates a workspace (bench/gen-tree.py into src/, a ci.toml, a BUILD.star with
# `local_source(name = "src", path = "src")` and a host task that reads every file of
# it), commits it to git, builds it once (cold), waits until every file is more
# than a second old (the stat cache's racy rule) and builds once more to settle
# the cache. Then, R times interleaved, so load on the machine hits all alike:
#   ci build //:count                   (no-op: the source re-ingested, both tasks cached)
#   ci store add src                    (the same tree through `ci store add`)
#   git status --porcelain              (git's no-op over the same files)
#   git add -A && git write-tree        (git's no-op snapshot)
# and the fixed costs: `ci --version` (process start) and `ci store add` of an
# empty directory (process start, RocksDB open and close, one empty layer).
# Prints the median and the range of each, in seconds, as a markdown table.
#
# Environment:
#   BENCH_DIR         where temp dirs go (default /var/tmp/strata-bench; not /tmp: tmpfs)
#   CARGO_TARGET_DIR  default ~/.cache/strata-target (as scripts/test)
#   STRATA_CI_BIN     use this `ci` binary instead of building one
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

FILES=100000
TOTAL_MIB=400
RUNS=7
SEED=2
KEEP=false
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
while (($#)); do
    case $1 in
        --files) FILES=$2; shift 2 ;;
        --total-mib) TOTAL_MIB=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --keep) KEEP=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v git >/dev/null 2>&1 || missing+=(git)
[[ -x /usr/bin/time ]] || missing+=(time)
((${#missing[@]} == 0)) || ensure_packages "${missing[@]}"

release_ci_bin
bench_work noop

WS=$WORK/ws
STORE=$WORK/store
export CI_STORE=$STORE NO_COLOR=1
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@localhost
export GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@localhost

log "generating $FILES files in $WS/src"
python3 "$ROOT/bench/gen-tree.py" --files "$FILES" --total-mib "$TOTAL_MIB" --seed "$SEED" "$WS/src" >&2
cat >"$WS/ci.toml" <<'EOF'
[build]
executor = "host"
EOF
cat >"$WS/BUILD.star" <<'EOF'
local_source(name = "src", path = "src")

task(
    name = "count",
    deps = [":src"],
    script = 'find "$CI_IN/src" -type f | wc -l > count.txt',
)
EOF
mkdir -p "$WORK/empty"
(cd "$WS" && git init -q . && git add -A && git commit -qm tree)
sync

cd "$WS"
log "cold build"
t0=$(date +%s.%N)
"$CI_BIN" build //:count >/dev/null
COLD=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
# Every entry must be more than a second older than the scan that caches it.
sleep 1.2
"$CI_BIN" build //:count >/dev/null
git status --porcelain >/dev/null
git add -A && git write-tree >/dev/null

declare -A T
time_once() { # NAME CMD...: append CMD's wall seconds to T[NAME]
    local name=$1 s
    shift
    /usr/bin/time -f '%e' -o "$WORK/time.out" "$@" >/dev/null 2>&1
    s=$(tail -n 1 "$WORK/time.out")
    T[$name]+="$s "
}
git_snapshot() { git add -A && git write-tree; }
export -f git_snapshot
for ((i = 0; i < RUNS; i++)); do
    log "round $((i + 1)) of $RUNS"
    time_once build "$CI_BIN" build //:count
    time_once add "$CI_BIN" store add src
    time_once status git status --porcelain
    time_once snapshot bash -c git_snapshot
    time_once version "$CI_BIN" --version
    time_once empty "$CI_BIN" store add "$WORK/empty"
done
HASHED=$("$CI_BIN" --json store add src | python3 -c 'import json, sys; print(json.load(sys.stdin)["hashed_files"])' 2>/dev/null || echo '?')

stat_of() { # median, min–max of the numbers in $1
    tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -n |
        awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
              printf "%.3f | %.2f–%.2f", m, v[1], v[NR] }'
}

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || REV="$REV (dirty)"
cat <<EOF
## No-op workspace benchmark

- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), strata commit $REV, \`ci\` at $CI_BIN
- machine: $(nproc) CPUs, kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)
- filesystem of $BASE: $FSTYPE
- workspace: $(find src -type f | wc -l) files, $(find src -mindepth 1 -type d | wc -l) dirs,
  $(find src -type l | wc -l) symlinks (\`bench/gen-tree.py --files $FILES --total-mib $TOTAL_MIB --seed $SEED\`)
- cold build: $COLD s; files hashed by the last no-op \`store add\`: $HASHED
- $RUNS rounds, interleaved; warm page cache

| what | median s | range s |
|---|---:|---:|
| \`ci build //:count\`, no-op (source re-ingested, 2 tasks cached) | $(stat_of "${T[build]}") |
| \`ci store add src\`, unchanged | $(stat_of "${T[add]}") |
| \`git status --porcelain\` | $(stat_of "${T[status]}") |
| \`git add -A && git write-tree\`, no-op | $(stat_of "${T[snapshot]}") |
| \`ci --version\` (process start) | $(stat_of "${T[version]}") |
| \`ci store add EMPTY\` (start, RocksDB open and close) | $(stat_of "${T[empty]}") |
EOF
