#!/usr/bin/env bash
# bench/remote.sh — the remote cache, beside Bazel's remote cache on the same server.
#
#   bench/remote.sh [--tasks N] [--files F] [--total-mib M] [--runs R] [--keep]
#
# Defaults: --tasks 1000 --files 20000 --total-mib 300 --runs 3.
#
# In one run, on loopback, against a `ci serve` with a fresh store:
#   1. host A (its own store) builds the N-task DAG of bench/gen-dag.py with
#      `--remote-cache` in write mode; then host B, with an empty store and the
#      workspace at another path, builds it again (all hits), R times, each from a
#      new empty store: wall time, requests and bytes (from the build's summary line);
#      once more with `--remote-fetch needed` (objects and bytes the server sent,
#      from its /metrics, against the first `all` run).
#   2. Bazel (npm @bazel/bazel-linux_x64) builds the same graph as N genrules with
#      `--remote_cache=http://` on the same `ci serve` (Bazel 2.1, the npm one, sends no token on gRPC uploads): once to fill it, then from
#      new output bases (all remote cache hits), R times; wall time of the build
#      command with a warm Bazel server (`bazel clean` between runs), and with a
#      cold one (the first of the runs).
#   3. one layer of F files / M MiB (bench/gen-tree.py): `ci store pull` into an
#      empty store, against `curl` of the same layer as one tar.zst (the server's
#      archive endpoint) piped into `tar -x` (with zstd), R times each.
# Prints a markdown table and the machine facts on stdout; progress on stderr.
#
# Environment:
#   BENCH_DIR        where temp dirs go (default /var/tmp/strata-bench)
#   STRATA_CI_BIN    use this `ci` binary instead of building a release one
#   STRATA_BAZEL     the Bazel binary (default: the one scripts/test installs with npm)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TASKS=1000
FILES=20000
TOTAL_MIB=300
RUNS=3
KEEP=false
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
while (($#)); do
    case $1 in
        --tasks) TASKS=$2; shift 2 ;;
        --files) FILES=$2; shift 2 ;;
        --total-mib) TOTAL_MIB=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --keep) KEEP=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/strata-target}
# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

command -v zstd >/dev/null 2>&1 || ensure_packages zstd
command -v curl >/dev/null 2>&1 || ensure_packages curl
release_ci_bin
BAZEL=${STRATA_BAZEL:-$HOME/.cache/strata-bazel/node_modules/@bazel/bazel-linux_x64/$(ls "$HOME/.cache/strata-bazel/node_modules/@bazel/bazel-linux_x64" 2>/dev/null | grep -m1 '^bazel-.*-linux-x86_64$' || true)}
if [[ ! -x $BAZEL ]]; then
    log "installing Bazel from npm into ~/.cache/strata-bazel"
    npm install --silent --prefix "$HOME/.cache/strata-bazel" @bazel/bazel-linux_x64 >&2
    BAZEL=$(ls "$HOME"/.cache/strata-bazel/node_modules/@bazel/bazel-linux_x64/bazel-*-linux-x86_64 | head -1)
fi
[[ -x $BAZEL ]] || die "no Bazel binary (set STRATA_BAZEL)"

bench_work remote
SERVER_PID=
bench_before_cleanup() {
    [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null || true
    for ob in "$WORK"/bazel-*; do
        [[ -d $ob ]] && "$BAZEL" --output_base="$ob" shutdown >/dev/null 2>&1 || true
    done
}
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || REV="$REV (dirty)"

secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- the server ------------------------------------------------------------------
log "generating $TASKS tasks"
python3 "$ROOT/bench/gen-dag.py" --tasks "$TASKS" "$WORK/dag" >/dev/null
log "starting ci serve"
"$CI_BIN" --store "$WORK/server" serve --listen 127.0.0.1:0 "$WORK/dag/strata" 2>"$WORK/serve.log" &
SERVER_PID=$!
for _ in $(seq 100); do
    URL=$(sed -n 's/^Serving on \(http:[^ ]*\).*/\1/p' "$WORK/serve.log")
    [[ -n $URL ]] && break
    sleep 0.1
done
[[ -n $URL ]] || die "ci serve did not start: $(cat "$WORK/serve.log")"
PORT=${URL##*:}
TOKEN=$("$CI_BIN" --store "$WORK/server" serve token create bench 2>/dev/null | tail -1)

# --- 1. ci: host A fills, host B hits ----------------------------------------------
cp -r "$WORK/dag/strata" "$WORK/host-a"
cp -r "$WORK/dag/strata" "$WORK/host-b"
log "host A builds and uploads"
t0=$EPOCHREALTIME
(cd "$WORK/host-a" && CI_TOKEN=$TOKEN "$CI_BIN" --store "$WORK/store-a" build --remote-cache "$URL" >/dev/null 2>"$WORK/a.err")
A_SECS=$(secs_since "$t0")
A_LINE=$(grep '^remote cache' "$WORK/a.err" || true)
CI_TIMES=()
for i in $(seq "$RUNS"); do
    log "host B, empty store, run $i"
    t0=$EPOCHREALTIME
    (cd "$WORK/host-b" && "$CI_BIN" --store "$WORK/store-b$i" build --remote-cache "$URL" >/dev/null 2>"$WORK/b$i.err")
    CI_TIMES+=("$(secs_since "$t0")")
done
B_LINE=$(grep '^remote cache' "$WORK/b1.err" || true)
# What the server sent: `all` (the first run) against `needed` (one more).
sent() { curl -s "$URL/metrics" | awk -v m="$1" '$1 == m { n = $2 } END { printf "%d", n }'; }
OBJ_M='strata_cache_objects_total{protocol="strata",direction="out"}'
BYTES_M='strata_cache_bytes_total{protocol="strata",direction="out"}'
ALL_OBJ=$(sent "$OBJ_M"); ALL_BYTES=$(sent "$BYTES_M")
log "host B, empty store, --remote-fetch needed"
t0=$EPOCHREALTIME
(cd "$WORK/host-b" && "$CI_BIN" --store "$WORK/store-lazy" build --remote-cache "$URL" --remote-fetch needed >/dev/null 2>"$WORK/lazy.err")
LAZY_SECS=$(secs_since "$t0")
LAZY_OBJ=$(( $(sent "$OBJ_M") - ALL_OBJ )); LAZY_BYTES=$(( $(sent "$BYTES_M") - ALL_BYTES ))
# The R `all` runs sent the same each: the first run's share.
ALL_OBJ=$(( ALL_OBJ / RUNS )); ALL_BYTES=$(( ALL_BYTES / RUNS ))
LAZY_LINE=$(grep '^remote cache' "$WORK/lazy.err" || true)
B_CACHED=$(grep -o '[0-9]* cached' "$WORK/b1.err" | tail -1)
CI_MED=$(printf '%s\n' "${CI_TIMES[@]}" | median)

# --- 2. Bazel on the same server ---------------------------------------------------
log "writing $TASKS genrules"
mkdir -p "$WORK/bzl"
: >"$WORK/bzl/WORKSPACE"
python3 - "$WORK/dag/ninja/build.ninja" "$WORK/bzl/BUILD" <<'PY'
import re, sys
rules = []
for line in open(sys.argv[1]):
    m = re.match(r"build out/(t\d+): (leaf|step)(.*)", line)
    if m:
        name, kind, ins = m.group(1), m.group(2), m.group(3).split()
        srcs = [":" + i.split("/")[1] for i in ins]
        if kind == "leaf":
            cmd = f"echo {name} | md5sum > $@"
        else:
            cmd = "{ cat $(SRCS); echo %s; } | md5sum > $@" % name
        rules.append(f'genrule(name = "{name}", srcs = {srcs!r}, outs = ["{name}.out"], cmd = {cmd!r})')
open(sys.argv[2], "w").write("\n".join(rules) + "\n")
PY
bazel_build() { # OUTPUT_BASE LOG
    (cd "$WORK/bzl" && "$BAZEL" --output_base="$1" --host_jvm_args=-Xmx1g build //:all --jobs=8 \
        --remote_cache="http://127.0.0.1:$PORT" --remote_header="Authorization=Bearer $TOKEN" \
        --noshow_progress --color=no >"$2" 2>&1) || die "bazel failed: $(tail -20 "$2")"
}
log "Bazel fills the cache"
bazel_build "$WORK/bazel-fill" "$WORK/bazel-fill.log"
"$BAZEL" --output_base="$WORK/bazel-fill" shutdown >/dev/null 2>&1 || true
BZ_TIMES=()
log "Bazel, new output base (cold server)"
t0=$EPOCHREALTIME
bazel_build "$WORK/bazel-hit" "$WORK/bazel-hit0.log"
BZ_COLD=$(secs_since "$t0")
BZ_LINE=$(grep -m1 'processes' "$WORK/bazel-hit0.log" || true)
for i in $(seq "$RUNS"); do
    log "Bazel, clean output, warm server, run $i"
    (cd "$WORK/bzl" && "$BAZEL" --output_base="$WORK/bazel-hit" clean >/dev/null 2>&1)
    t0=$EPOCHREALTIME
    bazel_build "$WORK/bazel-hit" "$WORK/bazel-hit$i.log"
    BZ_TIMES+=("$(secs_since "$t0")")
done
BZ_MED=$(printf '%s\n' "${BZ_TIMES[@]}" | median)

# --- 3. one big layer: ci store pull against curl + tar ------------------------------
log "generating $FILES files / $TOTAL_MIB MiB"
python3 "$ROOT/bench/gen-tree.py" --files "$FILES" --total-mib "$TOTAL_MIB" "$WORK/tree" >/dev/null
LAYER=$("$CI_BIN" --store "$WORK/store-a" store add "$WORK/tree" | awk '{ print $NF }' | tail -1)
CI_TOKEN=$TOKEN "$CI_BIN" --store "$WORK/store-a" store push "$LAYER" "$URL" >&2
PULL_TIMES=()
CURL_TIMES=()
for i in $(seq "$RUNS"); do
    log "pull, run $i"
    sync; echo 1 >/proc/sys/vm/drop_caches 2>/dev/null || true
    t0=$EPOCHREALTIME
    "$CI_BIN" --store "$WORK/pull$i" store pull "$LAYER" "$URL" >"$WORK/pull$i.out"
    PULL_TIMES+=("$(secs_since "$t0")")
    rm -rf "$WORK/pull$i"
    sync; echo 1 >/proc/sys/vm/drop_caches 2>/dev/null || true
    mkdir -p "$WORK/x$i"
    t0=$EPOCHREALTIME
    curl -sf "$URL/api/v1/layers/$LAYER/archive" | zstd -dc | tar -x -C "$WORK/x$i"
    CURL_TIMES+=("$(secs_since "$t0")")
    rm -rf "$WORK/x$i"
done
PULL_MED=$(printf '%s\n' "${PULL_TIMES[@]}" | median)
CURL_MED=$(printf '%s\n' "${CURL_TIMES[@]}" | median)
PULL_LINE=$(cat "$WORK/pull1.out")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
cat <<EOF2
### Remote cache (bench/remote.sh, $(date -u +%F), rev $REV)

- machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r); work dir on $FSTYPE; ci: $CI_BIN; Bazel: $("$BAZEL" --version 2>/dev/null | head -1)
- graph: \`bench/gen-dag.py --tasks $TASKS\`; layer: \`bench/gen-tree.py --files $FILES --total-mib $TOTAL_MIB\`; medians of $RUNS runs

| measure | ci | Bazel / curl | ratio | target |
|---|---|---|---|---|
| all-hits build of the DAG from an empty local cache | $CI_MED s (runs: ${CI_TIMES[*]}) | $BZ_MED s warm server (runs: ${BZ_TIMES[*]}); $BZ_COLD s cold server | $(ratio "$CI_MED" "$BZ_MED") | ≤ 0.5 |
| pull one layer ($FILES files, $TOTAL_MIB MiB) | $PULL_MED s (runs: ${PULL_TIMES[*]}) | $CURL_MED s curl \| zstd -d \| tar -x (runs: ${CURL_TIMES[*]}) | $(ratio "$PULL_MED" "$CURL_MED") | ≤ 1.5 |

- host A (fill, $TASKS tasks executed): $A_SECS s; \`$A_LINE\`
- host B: $B_CACHED; \`$B_LINE\`
- host B with \`--remote-fetch needed\`: $LAZY_SECS s; the server sent $LAZY_OBJ objects ($LAZY_BYTES B) against $ALL_OBJ ($ALL_BYTES B) with \`all\`; \`$LAZY_LINE\`
- Bazel: \`$BZ_LINE\`
- pull: \`$PULL_LINE\`
EOF2
