#!/usr/bin/env bash
# bench/docker.sh — per-task overhead of the docker executor against a bare `docker run --rm`.
#
#   bench/docker.sh [--tasks N] [--rounds R] [--keep]
#
# Defaults: --tasks 20 --rounds 3; --keep leaves the work dir in place.
#
# Builds `ci` in release mode, then, R rounds, each timing in turn (so drift hits all alike):
#   docker run   N sequential `docker run --rm --network none IMAGE echo task-I`
#   ci -j1       one `ci build -j1 //...` of N independent tasks `cmd = ["echo", "task-I"]`
#                in IMAGE, on an empty store (all N execute), one at a time like the above
#   ci each      N sequential `ci build //:tI`, one process per task (empty store)
#   ci cached    the same `ci build -j1 //...` again: every task cached, no container starts
# Reports the median per-task time of each, and each ci figure over `docker run`
# (the target: ci -j1 at most 1.2x docker run). Prints a markdown table and the
# machine facts on stdout; progress goes to stderr.
#
# Environment:
#   STRATA_TEST_IMAGE  the image (default strata-test/busybox:latest, built by scripts/test)
#   BENCH_DIR          where temp dirs go (default /var/tmp/strata-bench)
#   CARGO_TARGET_DIR   default ~/.cache/strata-target (as scripts/test)
#   STRATA_CI_BIN      use this `ci` binary instead of building one
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

TASKS=20
ROUNDS=3
KEEP=false
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
while (($#)); do
    case $1 in
        --tasks) TASKS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --keep) KEEP=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
((TASKS >= 1 && ROUNDS >= 1)) || { usage >&2; exit 2; }

# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

IMAGE=${STRATA_TEST_IMAGE:-strata-test/busybox:latest}
timeout 10 docker version >/dev/null 2>&1 || die "Docker does not answer: start it (scripts/test does)"
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE is missing: run scripts/test to build it"

# --- ci ------------------------------------------------------------------------------
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/strata-target}"
release_ci_bin

bench_work docker

WS=$WORK/ws
mkdir -p "$WS"
printf '[build]\nexecutor = "docker"\n' >"$WS/ci.toml"
{
    for ((i = 0; i < TASKS; i++)); do
        printf 'task(name = "t%d", image = "%s", cmd = ["echo", "task-%d"])\n' "$i" "$IMAGE" "$i"
    done
} >"$WS/BUILD.star"

now() { date +%s.%N; }
# per_task START END: milliseconds per task
per_task() { awk -v s="$1" -v e="$2" -v n="$TASKS" 'BEGIN { printf "%.1f", (e - s) * 1000 / n }'; }

# Warm-up: the image's layers in the page cache, the daemon's first-run costs paid.
docker run --rm --network none "$IMAGE" true >/dev/null
STORE=$WORK/store-warmup
(cd "$WS" && CI_STORE=$STORE "$CI_BIN" build -j1 //:t0 >/dev/null 2>&1) || die "ci cannot build a container task (run it by hand in $WS)"
rm -rf "$STORE"

declare -a RUN_T JOBS_T EACH_T CACHED_T
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS: $TASKS tasks each way"

    s=$(now)
    for ((i = 0; i < TASKS; i++)); do
        docker run --rm --network none "$IMAGE" echo "task-$i" >/dev/null
    done
    e=$(now)
    RUN_T+=("$(per_task "$s" "$e")")

    STORE=$WORK/store-j1-$r
    s=$(now)
    (cd "$WS" && CI_STORE=$STORE "$CI_BIN" build -j1 //... >/dev/null 2>&1) || die "ci build failed"
    e=$(now)
    JOBS_T+=("$(per_task "$s" "$e")")

    s=$(now)
    (cd "$WS" && CI_STORE=$STORE "$CI_BIN" build -j1 //... >/dev/null 2>&1) || die "ci build (cached) failed"
    e=$(now)
    CACHED_T+=("$(per_task "$s" "$e")")
    rm -rf "$STORE"

    STORE=$WORK/store-each-$r
    s=$(now)
    for ((i = 0; i < TASKS; i++)); do
        (cd "$WS" && CI_STORE=$STORE "$CI_BIN" build "//:t$i" >/dev/null 2>&1) || die "ci build //:t$i failed"
    done
    e=$(now)
    EACH_T+=("$(per_task "$s" "$e")")
    rm -rf "$STORE"
done

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.1f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
RUN_M=$(median "${RUN_T[@]}")
JOBS_M=$(median "${JOBS_T[@]}")
EACH_M=$(median "${EACH_T[@]}")
CACHED_M=$(median "${CACHED_T[@]}")

echo "| ($TASKS trivial tasks, median of $ROUNDS rounds) | ms per task | vs docker run | all rounds (ms) |"
echo "|---|---:|---:|---|"
echo "| \`docker run --rm --network none\` | $RUN_M | 1.00 | ${RUN_T[*]} |"
echo "| \`ci build -j1 //...\` (one process, all execute) | $JOBS_M | $(ratio "$JOBS_M" "$RUN_M") | ${JOBS_T[*]} |"
echo "| \`ci build //:tI\` (one process per task) | $EACH_M | $(ratio "$EACH_M" "$RUN_M") | ${EACH_T[*]} |"
echo "| \`ci build -j1 //...\` again (all cached, no container) | $CACHED_M | $(ratio "$CACHED_M" "$RUN_M") | ${CACHED_T[*]} |"
echo
DOCKER_VERSION=$(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})' 2>/dev/null)
DOCKER_DRIVER=$(docker info --format '{{.Driver}}' 2>/dev/null)
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr)," \
    "Docker $DOCKER_VERSION with the $DOCKER_DRIVER storage driver, image $IMAGE."
