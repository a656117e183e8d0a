#!/usr/bin/env bash
# bench/dag.sh — engine benchmark: a layered DAG of trivial tasks, `ci build` against ninja.
#
#   bench/dag.sh [--tasks N] [--width W] [--fan-in F] [--jobs J] [--runs R] [--seed S]
#                [--strace] [--keep]
#
# Defaults: --tasks 1000 --width 50 --fan-in 3 --jobs $(nproc) --runs 3 --seed 1.
#
# Generates the graph once with bench/gen-dag.py (N tasks in layers of W, each reading
# the outputs of F tasks of the layer before and writing one small file; the same shell
# command in both systems), then, R times, each time in fresh directories and a fresh
# store, with the same -j for both tools (ci first in odd runs, ninja first in even ones):
#   ci cold     `ci build` in workspace copy A with an empty store
#   ci no-op    `ci build` in A again (every task is an action-cache hit)
#   ci fresh    `ci build` in workspace copy B: same content at another path, same store.
#               B has no label records, no stat cache and no runs of its own; the action
#               cache is warm (what a new CI checkout sees with a shared cache)
#   ninja cold  `ninja` in build-dir copy A; `sync` after it is timed separately
#   ninja no-op `ninja` in A again
#   ninja fresh `ninja` in build-dir copy B: ninja has no shared cache, so a fresh
#               checkout rebuilds everything (the figure to compare `ci fresh` with)
# Checks every run's counts (`--json` summary) and that both tools computed the same
# bytes for a sample of tasks. Prints a markdown table (median, min, max of R runs), the
# mean per-task time inside each tool (ci: `duration_ms` of its events; ninja: .ninja_log),
# and the machine facts on stdout; progress goes to stderr.
# --strace adds one extra cold `ci build` under `strace -f -c` (syscall summary).
#
# Environment:
#   BENCH_DIR         where temp dirs go (default /var/tmp/strata-bench; not /tmp: tmpfs)
#   CARGO_TARGET_DIR  default ~/.cache/strata-target (as scripts/test)
#   STRATA_CI_BIN     use this `ci` binary instead of building one
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

TASKS=1000
WIDTH=50
FAN_IN=3
JOBS=$(nproc)
RUNS=3
SEED=1
STRACE=false
KEEP=false
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
while (($#)); do
    case $1 in
        --tasks) TASKS=$2; shift 2 ;;
        --width) WIDTH=$2; shift 2 ;;
        --fan-in) FAN_IN=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --strace) STRACE=true; shift ;;
        --keep) KEEP=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

# --- tools ------------------------------------------------------------------------
missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
command -v md5sum >/dev/null 2>&1 || missing+=(coreutils)
if $STRACE && ! command -v strace >/dev/null 2>&1; then missing+=(strace); fi
((${#missing[@]} == 0)) || ensure_packages "${missing[@]}"

# --- the ci binary --------------------------------------------------------------------
release_ci_bin

# --- work dir ---------------------------------------------------------------------------
bench_work dag

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || REV="$REV (dirty)"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

log "generating $TASKS tasks (width $WIDTH, fan-in $FAN_IN, seed $SEED) in $WORK/src"
python3 "$ROOT/bench/gen-dag.py" --tasks "$TASKS" --width "$WIDTH" --fan-in "$FAN_IN" \
    --seed "$SEED" "$WORK/src"
LAST=$(awk -F'"' '/^task\(/ { n = $2 } END { print n }' "$WORK/src/strata/BUILD.star")

# Wall seconds of CMD (stdout to OUT), into the global SECS.
timed() {
    local out=$1 t0 t1
    shift
    t0=$EPOCHREALTIME
    "$@" >"$out" || die "\`$*\` failed (exit $?)"
    t1=$EPOCHREALTIME
    SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
}

# json_field FILE FIELD: a field of the `summary` line of a `ci --json` stream.
json_field() {
    python3 -c 'import json, sys
for line in open(sys.argv[1]):
    v = json.loads(line)
    if "summary" in v:
        print(v["summary"][sys.argv[2]])' "$1" "$2"
}

# expect_summary FILE EXECUTED CACHED: the run succeeded with these counts.
expect_summary() {
    local state executed cached
    state=$(json_field "$1" state)
    executed=$(json_field "$1" executed)
    cached=$(json_field "$1" cached)
    [[ $state == succeeded && $executed == "$2" && $cached == "$3" ]] ||
        die "$1: expected a succeeded run with $2 executed and $3 cached, got $state, $executed, $cached"
}

# Mean `duration_ms` of the executed tasks of a `ci --json` stream.
ci_task_ms() {
    python3 -c 'import json, sys
d = [v["duration_ms"] for v in map(json.loads, open(sys.argv[1]))
     if v.get("event") == "task_finished" and not v["cached"]]
print("%.1f" % (sum(d) / len(d)) if d else "n/a")' "$1"
}

# Mean edge time of a .ninja_log (v5: start end mtime path hash, tab-separated).
ninja_task_ms() {
    awk -F'\t' 'NR > 1 { s += $2 - $1; n++ } END { if (n) printf "%.1f", s / n; else print "n/a" }' "$1"
}

declare -A T
record() { T[$1]="${T[$1]:-} $2"; }

for ((r = 1; r <= RUNS; r++)); do
    R=$WORK/run$r
    mkdir -p "$R"
    cp -a "$WORK/src/strata" "$R/ws-a"
    cp -a "$WORK/src/strata" "$R/ws-b"
    cp -a "$WORK/src/ninja" "$R/ninja-a"
    cp -a "$WORK/src/ninja" "$R/ninja-b"
    sync

    # The order alternates: deleting the previous run's directories makes the
    # next inode allocations slower for a while on ext4 without a journal
    # (it skips recently deleted inodes), and whoever goes first pays most.
    run_ci() {
        log "run $r/$RUNS: ci cold"
        timed "$R/cold.json" "$CI_BIN" --store "$R/store" --json build -C "$R/ws-a" -j "$JOBS"
        expect_summary "$R/cold.json" "$TASKS" 0
        record ci_cold "$SECS"
        record ci_task "$(ci_task_ms "$R/cold.json")"
        log "run $r/$RUNS: ci no-op"
        timed "$R/noop.json" "$CI_BIN" --store "$R/store" --json build -C "$R/ws-a" -j "$JOBS"
        expect_summary "$R/noop.json" 0 "$TASKS"
        record ci_noop "$SECS"
        log "run $r/$RUNS: ci fresh checkout, warm cache"
        timed "$R/fresh.json" "$CI_BIN" --store "$R/store" --json build -C "$R/ws-b" -j "$JOBS"
        expect_summary "$R/fresh.json" 0 "$TASKS"
        record ci_fresh "$SECS"
    }
    run_ninja() {
        log "run $r/$RUNS: ninja cold"
        timed /dev/null ninja -C "$R/ninja-a" -j "$JOBS"
        record ninja_cold "$SECS"
        record ninja_task "$(ninja_task_ms "$R/ninja-a/.ninja_log")"
        timed /dev/null sync
        record ninja_sync "$SECS"
        log "run $r/$RUNS: ninja no-op"
        timed "$R/ninja-noop.out" ninja -C "$R/ninja-a" -j "$JOBS"
        grep -q 'no work to do' "$R/ninja-noop.out" || die "the second ninja run did work"
        record ninja_noop "$SECS"
        log "run $r/$RUNS: ninja fresh checkout"
        timed /dev/null ninja -C "$R/ninja-b" -j "$JOBS"
        record ninja_fresh "$SECS"
    }
    if ((r % 2)); then
        run_ci
        run_ninja
    else
        run_ninja
        run_ci
    fi

    # Same bytes in both systems, for a sample of tasks (and the last one).
    sample=("$LAST")
    for ((i = 0; i < TASKS; i += TASKS / 20 + 1)); do
        sample+=("$(printf 't%0*d' "$((${#LAST} - 1))" "$i")")
    done
    for n in "${sample[@]}"; do
        a=$(cd "$R/ws-a" && "$CI_BIN" --store "$R/store" store cat "//:$n" out)
        b=$(cat "$R/ninja-a/out/$n")
        [[ $a == "$b" ]] || die "ci and ninja disagree on $n: '$a' vs '$b'"
    done
    $KEEP || rm -rf "$R"
done

# median/min/max of a recorded series
stats() {
    tr ' ' '\n' <<<"${T[$1]}" | awk 'NF' | sort -g | awk '
        { v[NR] = $1 }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
              printf "%.3f | %.3f | %.3f", m, v[1], v[NR] }'
}
median() { stats "$1" | cut -d'|' -f1 | tr -d ' '; }
ms() { awk -v s="$1" 'BEGIN { printf "%.0f", s * 1000 }'; }

STRACE_OUT=
if $STRACE; then
    log "strace: one more cold ci build"
    S=$WORK/strace
    cp -a "$WORK/src/strata" "$S"
    strace -f -c -o "$WORK/strace.txt" "$CI_BIN" --store "$WORK/strace-store" --json build -C "$S" -j "$JOBS" >/dev/null
    STRACE_OUT=$(head -n 25 "$WORK/strace.txt")
fi

CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
RATIO=$(awk -v a="$(median ci_cold)" -v b="$(median ninja_cold)" 'BEGIN { printf "%.2f", a / b }')

cat <<EOF
## Engine: 1,000-task DAG

- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), strata commit $REV
- machine: $(nproc) CPUs ($CPU), $MEM RAM, kernel $(uname -r);
  load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)
- filesystem of $BASE: $FSTYPE ($(df -T "$WORK" | awk 'NR == 2 { print $1 }'),
  mount options $(findmnt -no OPTIONS -T "$WORK" 2>/dev/null || echo unknown))
- graph: \`bench/gen-dag.py --tasks $TASKS --width $WIDTH --fan-in $FAN_IN --seed $SEED\`:
  $TASKS tasks in layers of $WIDTH, each reading $FAN_IN outputs of the layer before
  and writing one md5sum line; the same shell commands in both tools
- both tools with \`-j $JOBS\`; $RUNS runs, each in fresh directories and a fresh store;
  \`ci\` is the release build, host executor, \`--json\` to a file
- \`ci\` makes every output durable (fsync/syncfs) before recording it; ninja does not
  (its \`sync\` is timed separately)
- tools: $(ninja --version | sed 's/^/ninja /'), $("$CI_BIN" --version)

| tool | build | median s | min s | max s |
|---|---|---:|---:|---:|
| ci | cold (empty store) | $(stats ci_cold) |
| ci | no-op (same workspace, all cached) | $(stats ci_noop) |
| ci | fresh checkout at another path, warm cache (all cached) | $(stats ci_fresh) |
| ninja | cold | $(stats ninja_cold) |
| ninja | \`sync\` after the cold build | $(stats ninja_sync) |
| ninja | no-op | $(stats ninja_noop) |
| ninja | fresh checkout (no shared cache: rebuilds all) | $(stats ninja_fresh) |

- cold: ci / ninja = **${RATIO}x**; no-op: ci $(ms "$(median ci_noop)") ms, ninja $(ms "$(median ninja_noop)") ms
- mean time per executed task inside the tool (median of runs): ci $(median ci_task) ms
  (\`duration_ms\`: prepare, run, capture, record), ninja $(median ninja_task) ms (.ninja_log)
EOF
if [[ -n $STRACE_OUT ]]; then
    printf '\n`strace -f -c` of one cold `ci build` (top 20 syscalls by time):\n\n```\n%s\n```\n' "$STRACE_OUT"
fi
