#!/usr/bin/env bash
# bench/ingest.sh — store ingest benchmark: `ci store add` against b3sum, cp -a and git.
#
#   bench/ingest.sh [--files N] [--total-mib M] [--big-gib G] [--seed S] [--keep]
#
# Defaults: --files 20000 --total-mib 300 --big-gib 4 (0 skips the big file) --seed 1;
# --keep leaves the work dir in place.
#
# Builds `ci` in release mode, generates a deterministic tree with bench/gen-tree.py
# (default 20,000 files, ~300 MiB) and one big file (default 4 GiB), and times, one
# run each, warm page cache (the data was just written and synced; caches are not dropped):
#   ci store add TREE (cold, empty store), again (unchanged tree: stat cache),
#   ci store add COPY (same content at another path: blobs present, stat cache cold),
#   b3sum over every file, cp -a TREE COPY (+ the sync that flushes it),
#   git add -A && git write-tree (cold, then again as a no-op),
#   then both no-ops 5 times, interleaved, reporting the medians side by side,
#   ci store add of a directory holding the big file (wall time and peak RSS), b3sum of it.
# Prints a markdown table and the machine facts on stdout; progress goes to stderr.
#
# Environment:
#   BENCH_DIR         where temp dirs go (default /var/tmp/strata-bench; not /tmp: tmpfs)
#   CARGO_TARGET_DIR  default ~/.cache/strata-target (as scripts/test)
#   STRATA_CI_BIN     use this `ci` binary instead of building one
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

FILES=20000
TOTAL_MIB=300
BIG_GIB=4
SEED=1
KEEP=false
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
while (($#)); do
    case $1 in
        --files) FILES=$2; shift 2 ;;
        --total-mib) TOTAL_MIB=$2; shift 2 ;;
        --big-gib) BIG_GIB=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
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
command -v b3sum >/dev/null 2>&1 || missing+=(b3sum)
command -v git >/dev/null 2>&1 || missing+=(git)
[[ -x /usr/bin/time ]] || missing+=(time)
((${#missing[@]} == 0)) || ensure_packages "${missing[@]}"

# --- the ci binary --------------------------------------------------------------------
release_ci_bin

# --- work dir ---------------------------------------------------------------------------
bench_work run
# Tree on disk (block overhead of small files) x4: tree, store, copy, git objects.
# The big phase runs after those are deleted: the file plus its copy in the store.
need_tree=$(awk -v m="$TOTAL_MIB" 'BEGIN { printf "%d", m * 1.3 * 4 }')
need_big=$(awk -v m="$TOTAL_MIB" -v g="$BIG_GIB" 'BEGIN { printf "%d", m * 1.3 + g * 1024 * 2 }')
need=$(((need_tree > need_big ? need_tree : need_big) + 512))
avail=$(df --output=avail -BM "$WORK" | awk 'NR == 2 { print $1 + 0 }')
((avail >= need)) || die "$BASE has $avail MiB free, this run needs about $need MiB"

TREE=$WORK/tree
COPY=$WORK/copy
STORE=$WORK/store
GIT_DIR_=$WORK/git
BIGDIR=$WORK/big
STORE2=$WORK/store-big

ROWS=()
FAILED=0
# measure TOOL WHAT OUT CMD...: run CMD once under /usr/bin/time (wall seconds, peak RSS),
# stdout to OUT. Meanwhile sample the anonymous RSS (RssAnon) of CMD's process every
# 50 ms: peak RSS also counts file pages the process maps (b3sum mmaps big files, and so
# may ci), so a file-sized RSS is not necessarily a memory bound broken. For a `bash -c`
# pipeline only the shell is sampled: no anon column then.
measure() {
    local tool=$1 what=$2 out=$3 rc=0 secs kib tpid cpid='' peak=0 k v anon='n/a'
    shift 3
    log "$tool: $what"
    /usr/bin/time -f '%e %M' -o "$WORK/time.out" "$@" >"$out" &
    tpid=$!
    while kill -0 "$tpid" 2>/dev/null; do
        [[ -n $cpid ]] || cpid=$(ps -o pid= --ppid "$tpid" 2>/dev/null | head -n 1 | tr -d ' ' || true)
        if [[ -n $cpid ]]; then
            while read -r k v _; do
                if [[ $k == RssAnon: ]] && ((v > peak)); then peak=$v; fi
            done 2>/dev/null </proc/"$cpid"/status || true
        fi
        sleep 0.05
    done
    wait "$tpid" || rc=$?
    [[ $1 == bash ]] || ((peak == 0)) || anon=$(awk -v k="$peak" 'BEGIN { printf "%.1f", k / 1024 }')
    what=${what//|/\\|}
    if ((rc)); then
        ROWS+=("| $tool | $what | failed (exit $rc) | | |")
        FAILED=1
        return 0
    fi
    read -r secs kib < <(tail -n 1 "$WORK/time.out")
    ROWS+=("| $tool | $what | $secs | $(awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1024 }') | $anon |")
}
mib() { du -s --apparent-size -BM "$1" 2>/dev/null | awk '{ print $1 + 0 }'; }
disk_mib() { du -s -BM "$1" 2>/dev/null | awk '{ print $1 + 0 }'; }

# --- the tree -------------------------------------------------------------------------------
log "generating the tree in $TREE"
t0=$SECONDS
python3 "$ROOT/bench/gen-tree.py" --files "$FILES" --total-mib "$TOTAL_MIB" --seed "$SEED" "$TREE"
sync
GEN_SECS=$((SECONDS - t0))
N_FILES=$(find "$TREE" -type f | wc -l)
N_DIRS=$(find "$TREE" -mindepth 1 -type d | wc -l)
N_LINKS=$(find "$TREE" -type l | wc -l)
TREE_MIB=$(mib "$TREE")

measure ci "store add TREE, cold (empty store)" "$WORK/digest.cold" \
    "$CI_BIN" --store "$STORE" store add "$TREE"
sync
measure ci "store add TREE again, unchanged (stat cache)" "$WORK/digest.again" \
    "$CI_BIN" --store "$STORE" store add "$TREE"

measure b3sum "every file: find -print0 | xargs -0 b3sum" /dev/null \
    bash -c 'find "$1" -type f -print0 | xargs -0 b3sum' _ "$TREE"

measure "cp -a" "cp -a TREE COPY (fresh target)" /dev/null cp -a "$TREE" "$COPY"
measure sync "sync after cp -a (flush the copy)" /dev/null sync

measure ci "store add COPY (same content, new path: blobs stored, stat cache cold)" "$WORK/digest.copy" \
    "$CI_BIN" --store "$STORE" store add "$COPY"
sync

export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
git init -q --bare "$GIT_DIR_"
git_add() { GIT_DIR=$GIT_DIR_ GIT_WORK_TREE=$TREE git -C "$TREE" add -A && GIT_DIR=$GIT_DIR_ git write-tree; }
export -f git_add
export GIT_DIR_ TREE
measure git "git add -A && git write-tree, cold (new repo)" "$WORK/git.cold" bash -c git_add
sync
measure git "git add -A && git write-tree again (no-op)" "$WORK/git.again" bash -c git_add

# The two no-ops side by side, 5 rounds interleaved (load hits both alike): medians.
CI_NOOP=()
GIT_NOOP=()
wall() { /usr/bin/time -f '%e' -o "$WORK/time.out" "$@" >/dev/null 2>&1 && tail -n 1 "$WORK/time.out"; }
for _ in 1 2 3 4 5; do
    CI_NOOP+=("$(wall "$CI_BIN" --store "$STORE" store add "$TREE")")
    GIT_NOOP+=("$(wall bash -c git_add)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ROWS+=("| ci | store add TREE unchanged, 5 runs interleaved with git's: median (all) | $(median "${CI_NOOP[@]}") (${CI_NOOP[*]}) | | |")
ROWS+=("| git | no-op add + write-tree, 5 runs interleaved with ci's: median (all) | $(median "${GIT_NOOP[@]}") (${GIT_NOOP[*]}) | | |")

# The 16 MiB reserve file is space held back, not content.
RESERVE_MIB=$(disk_mib "$STORE/reserve")
STORE_MIB=$(( $(disk_mib "$STORE") - ${RESERVE_MIB:-0} ))
GIT_MIB=$(disk_mib "$GIT_DIR_")
TREE_DISK_MIB=$(disk_mib "$TREE")
D_COLD=$(tr -d '[:space:]' <"$WORK/digest.cold")
D_AGAIN=$(tr -d '[:space:]' <"$WORK/digest.again")
D_COPY=$(tr -d '[:space:]' <"$WORK/digest.copy")
GIT_TREE=$(tr -d '[:space:]' <"$WORK/git.cold")
rm -rf "$COPY" "$STORE" "$GIT_DIR_" "$TREE"

# --- one big file (--big-gib 0 skips it) ------------------------------------------------------------
if awk -v g="$BIG_GIB" 'BEGIN { exit !(g > 0) }'; then
    log "generating a $BIG_GIB GiB file"
    mkdir -p "$BIGDIR"
    python3 "$ROOT/bench/gen-tree.py" --single-file-gib "$BIG_GIB" --seed "$SEED" "$BIGDIR/big.bin"
    sync
    measure ci "store add of a dir with one $BIG_GIB GiB file (cold)" "$WORK/digest.big" \
        "$CI_BIN" --store "$STORE2" store add "$BIGDIR"
    measure b3sum "the $BIG_GIB GiB file" /dev/null b3sum "$BIGDIR/big.bin"
fi

# --- report --------------------------------------------------------------------------------------
NOTES=()
[[ -n $D_COLD ]] || NOTES+=("- **ci printed no digest for the cold add**")
[[ $D_COLD == "$D_AGAIN" ]] || NOTES+=("- **digest mismatch**: cold \`$D_COLD\`, again \`$D_AGAIN\`")
[[ $D_COLD == "$D_COPY" ]] || NOTES+=("- **digest mismatch**: TREE \`$D_COLD\`, COPY \`$D_COPY\`")

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || REV="$REV (dirty)"
CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)

cat <<EOF
## Store ingest benchmark

- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), strata commit $REV
- machine: $(nproc) CPUs ($CPU), $MEM RAM, kernel $(uname -r)
- filesystem of $BASE: $FSTYPE ($(df -T "$WORK" | awk 'NR == 2 { print $1 }'))
- tree: $N_FILES files, $N_DIRS dirs, $N_LINKS symlinks, $TREE_MIB MiB ($TREE_DISK_MIB MiB on disk),
  \`bench/gen-tree.py --files $FILES --total-mib $TOTAL_MIB --seed $SEED\` (generated and synced in ${GEN_SECS} s);
  big file: $BIG_GIB GiB
- warm page cache: each input was just written and synced; caches are not dropped. One run each.
- peak RSS is /usr/bin/time's %M and counts mmapped file pages; the anon column samples RssAnon every 50 ms.
- \`ci\` fsyncs blobs; \`cp -a\` does not, its flush is the separate sync row. \`git\` zlib-compresses every object.
- store after the three adds: $STORE_MIB MiB on disk; git repository: $GIT_MIB MiB
- layer \`$D_COLD\`, git tree \`$GIT_TREE\`
- tools: $(b3sum --version), $(git --version), $(cp --version | head -n 1)

| tool | what | seconds | peak RSS MiB | peak anon RSS MiB (sampled) |
|---|---|---:|---:|---:|
EOF
printf '%s\n' "${ROWS[@]}"
if ((${#NOTES[@]})); then
    printf '\n'
    printf '%s\n' "${NOTES[@]}"
fi
exit "$FAILED"
