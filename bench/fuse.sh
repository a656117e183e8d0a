#!/usr/bin/env bash
# bench/fuse.sh — LayerFs against kernel overlayfs and fuse-overlayfs over a checkout.
#
#   bench/fuse.sh [--files N] [--total-mib M] [--big-gib G] [--runs R] [--seed S] [--keep]
#
# Defaults: --files 20000 --total-mib 200 --big-gib 1 --runs 3 --seed 1.
# Must run as root (kernel overlay mounts, dropping the page cache).
#
# Builds `ci` in release mode, generates one layer holding a deterministic tree
# (bench/gen-tree.py, 20,000 files) and one big file (1 GiB), adds it to a fresh store,
# checks it out, and serves it four ways:
#   layerfs       `ci mount --background LAYER` (the store itself, nothing copied; FUSE
#                 passthrough where the kernel has it: the kernel reads the blob files)
#   layerfs-served  the same with CI_FUSE_PASSTHROUGH=0: every read served by LayerFs
#   kernel-ovl    kernel overlayfs, lower = the checkout, empty upper (what a task sees)
#   fuse-ovl      fuse-overlayfs, lower = the checkout, empty upper
#   checkout      the checkout itself (the local-disk reference)
# For each, R times: the two workloads cold (fresh mount of everything, then
# `echo 3 > /proc/sys/vm/drop_caches`) and warm (again, right after):
#   read          `cat big.bin > /dev/null` (sequential read of the big file)
#   stat walk     `find tree -printf '%s %m\n' > /dev/null` (lstat of every entry)
# Prints a markdown table of medians (min–max) on stdout; progress goes to stderr.
#
# Environment:
#   BENCH_DIR         where temp dirs go (default /var/tmp/strata-bench; not /tmp: tmpfs)
#   CARGO_TARGET_DIR  default ~/.cache/strata-target (as scripts/test)
#   STRATA_CI_BIN     use this `ci` binary instead of building one
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

FILES=20000
TOTAL_MIB=200
BIG_GIB=1
RUNS=3
SEED=1
KEEP=false
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
while (($#)); do
    case $1 in
        --files) FILES=$2; shift 2 ;;
        --total-mib) TOTAL_MIB=$2; shift 2 ;;
        --big-gib) BIG_GIB=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --keep) KEEP=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

[[ $(id -u) -eq 0 ]] || die "run as root: kernel overlay mounts and dropping caches need it"
command -v fuse-overlayfs >/dev/null 2>&1 || die "fuse-overlayfs is missing (apt-get install fuse-overlayfs)"
command -v python3 >/dev/null 2>&1 || die "python3 is missing"

# --- the ci binary --------------------------------------------------------------------
release_ci_bin

# --- work dir ---------------------------------------------------------------------------
bench_work fuse
export CI_STORE=$WORK/store
# Mount records of this run stay in the work dir.
export XDG_RUNTIME_DIR=$WORK/run
mkdir -p "$XDG_RUNTIME_DIR"

unmount_all() {
    local m
    for m in "$WORK"/mnt-*; do
        [[ -d $m ]] || continue
        if mountpoint -q "$m"; then
            "$CI_BIN" umount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true
        fi
    done
}
bench_before_cleanup() { unmount_all; }

# --- data ---------------------------------------------------------------------------------
log "generating $FILES files (~$TOTAL_MIB MiB) and a $BIG_GIB GiB file"
mkdir -p "$WORK/src"
python3 "$ROOT/bench/gen-tree.py" --files "$FILES" --total-mib "$TOTAL_MIB" --seed "$SEED" "$WORK/src/tree" >&2
python3 "$ROOT/bench/gen-tree.py" --single-file-gib "$BIG_GIB" --seed "$SEED" "$WORK/src/big.bin" >&2
log "ci store add"
LAYER=$("$CI_BIN" store add "$WORK/src")
log "layer $LAYER; checking it out"
"$CI_BIN" store checkout "$LAYER" "$WORK/checkout"
rm -rf "$WORK/src"
sync

SETUPS=(layerfs layerfs-served kernel-ovl fuse-ovl checkout)
mount_setup() {
    local s=$1 m=$WORK/mnt-$1
    rm -rf "$WORK/upper-$s" "$WORK/work-$s"
    mkdir -p "$m" "$WORK/upper-$s" "$WORK/work-$s"
    case $s in
        layerfs) "$CI_BIN" mount --background "$LAYER" "$m" 2>/dev/null ;;
        layerfs-served) CI_FUSE_PASSTHROUGH=0 "$CI_BIN" mount --background "$LAYER" "$m" 2>/dev/null ;;
        kernel-ovl) mount -t overlay overlay -o "lowerdir=$WORK/checkout,upperdir=$WORK/upper-$s,workdir=$WORK/work-$s,redirect_dir=off" "$m" ;;
        fuse-ovl) fuse-overlayfs -o "lowerdir=$WORK/checkout,upperdir=$WORK/upper-$s,workdir=$WORK/work-$s" "$m" ;;
        checkout) ;;
    esac
}
dir_of() { if [[ $1 == checkout ]]; then echo "$WORK/checkout"; else echo "$WORK/mnt-$1"; fi; }
unmount_setup() {
    local m=$WORK/mnt-$1
    case $1 in
        layerfs | layerfs-served) "$CI_BIN" umount "$m" ;;
        kernel-ovl | fuse-ovl) umount "$m" ;;
        checkout) ;;
    esac
}

# seconds CMD...: wall time of CMD in seconds (3 decimals).
seconds() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'
}
read_big() { cat "$1/big.bin" >/dev/null; }
stat_walk() { find "$1/tree" -printf '%s %m\n' >/dev/null; }

declare -A T
for ((r = 1; r <= RUNS; r++)); do
    for s in "${SETUPS[@]}"; do
        for w in read stat; do
            log "run $r/$RUNS: $s, $w"
            mount_setup "$s"
            d=$(dir_of "$s")
            sync
            echo 3 >/proc/sys/vm/drop_caches
            fn=read_big
            [[ $w == stat ]] && fn=stat_walk
            T[$s,$w,cold]+="$(seconds $fn "$d") "
            T[$s,$w,warm]+="$(seconds $fn "$d") "
            unmount_setup "$s"
        done
    done
done

# stats "a b c": median (min–max)
stats() {
    tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '
        { v[NR] = $1 }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
              printf "%.3f (%.3f–%.3f)", m, v[1], v[NR] }'
}
median() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mibs() { awk -v g="$BIG_GIB" -v s="$1" 'BEGIN { if (s > 0) printf "%.0f", g * 1024 / s; else print "-" }'; }

echo "| served by | read ${BIG_GIB} GiB cold, s | warm, s | cold MiB/s | warm MiB/s | stat walk ${FILES} files cold, s | warm, s |"
echo "|---|---|---|---|---|---|---|"
for s in "${SETUPS[@]}"; do
    echo "| $s | $(stats "${T[$s,read,cold]}") | $(stats "${T[$s,read,warm]}") | $(mibs "$(median "${T[$s,read,cold]}")") | $(mibs "$(median "${T[$s,read,warm]}")") | $(stats "${T[$s,stat,cold]}") | $(stats "${T[$s,stat,warm]}") |"
done
echo
echo "Median of $RUNS runs (min–max). Machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r), $FSTYPE under $BASE, fuse-overlayfs $(fuse-overlayfs --version 2>/dev/null | awk '/fuse-overlayfs/ { print $3 }')."
