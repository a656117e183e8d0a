#!/usr/bin/env bash
# bench/serve.sh — `ci serve` under load, beside nginx serving the same bytes.
#
#   bench/serve.sh [--tasks N] [--clients C] [--duration SECONDS] [--keep]
#
# Defaults: --tasks 1000 --clients 200 --duration 10.
#
# In one run, against a release `ci serve` on 127.0.0.1 with a fresh store:
#   1. read latency at 100 concurrent connections (wrk, 2 threads): GET /api/v1/runs/{id}
#      of a finished N-task run, and a layer listing (GET /api/v1/layers/{l}/tree?recursive=true),
#      each beside nginx serving the same answer as a static file (what a user would
#      otherwise put in front of a JSON dump); p50, p99, requests/s.
#   2. delay from an engine event to an SSE client: one task waits until the client is
#      connected, then prints its clock (`date +%s%N`) 200 times; the client measures
#      when each line arrives (p50, p99, max).
#   3. server memory with C SSE clients following a live N-task run: the server's peak
#      RSS (VmHWM) and RSS at the end, and whether every client received every event.
# Prints a markdown table and the machine facts on stdout; progress on stderr.
#
# Environment:
#   BENCH_DIR         where temp dirs go (default /var/tmp/strata-bench)
#   STRATA_CI_BIN     use this `ci` binary instead of building a release one
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TASKS=1000
CLIENTS=200
DURATION=10
KEEP=false
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
while (($#)); do
    case $1 in
        --tasks) TASKS=$2; shift 2 ;;
        --clients) CLIENTS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --keep) KEEP=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"
ensure_packages wrk nginx-light python3
release_ci_bin
bench_work serve

SERVER_PID=
NGINX_PID=
bench_before_cleanup() {
    [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    [[ -n $NGINX_PID ]] && kill "$NGINX_PID" 2>/dev/null
    true
}

export CI_STORE=$WORK/store
export XDG_CACHE_HOME=$WORK/cache
WS=$WORK/ws
mkdir -p "$WS"
printf 'name = "bench"\n[build]\nexecutor = "host"\n' >"$WS/ci.toml"
cat >"$WS/BUILD.star" <<STAR
[task(name = "t%d" % i, script = "mkdir -p out/d%d; echo %d > out/d%d/f; echo task %d" % (i % 50, i, i % 50, i)) for i in range($TASKS)]
STAR
mkdir -p "$WS/clock"
cat >"$WS/clock/BUILD.star" <<STAR
task(name = "clock", pure = False, script = "while [ ! -e $WORK/go ]; do sleep 0.01; done; for i in \$(seq 200); do echo clock \$(date +%s%N); sleep 0.01; done")
STAR

TOKEN=$(cd "$WS" && "$CI_BIN" serve token create bench)
start_server() {
    (cd "$WS" && exec "$CI_BIN" serve --listen 127.0.0.1:0 . 2>"$WORK/serve.log") &
    SERVER_PID=$!
    for _ in $(seq 100); do
        URL=$(sed -n 's/^Serving on //p' "$WORK/serve.log")
        [[ -n $URL ]] && return 0
        sleep 0.1
    done
    die "ci serve did not start: $(cat "$WORK/serve.log")"
}
start_run() {
    curl -sf -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
        -d "{\"targets\": [$1]}" "$URL/api/v1/workspaces/bench/runs" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
wait_run() { curl -sfN "$URL/api/v1/runs/$1/events" >/dev/null; }

start_server
log "server at $URL; a $TASKS-task run to read"
RUN=$(start_run '"//:all"')
wait_run "$RUN"
LAYER=$(curl -sf "$URL/api/v1/runs/$RUN" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["tasks"]["//:t1"]["output"])')
# A layer worth listing: every task's output side by side is one tree per task; list the biggest.
mkdir -p "$WORK/html/api/v1/runs" "$WORK/html/tree"
curl -sf "$URL/api/v1/runs/$RUN" >"$WORK/html/api/v1/runs/$RUN"
curl -sf "$URL/api/v1/layers/$LAYER/tree?recursive=true" >"$WORK/html/tree/listing"
RUN_BYTES=$(stat -c %s "$WORK/html/api/v1/runs/$RUN")

cat >"$WORK/nginx.conf" <<CONF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    default_type application/json;
    server { listen 127.0.0.1:0; root $WORK/html; }
}
CONF
# nginx cannot listen on port 0: pick a free port.
NGINX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -i "s/listen 127.0.0.1:0/listen 127.0.0.1:$NGINX_PORT/" "$WORK/nginx.conf"
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
sleep 0.5

# wrk's latency distribution: p50 and p99 in ms, requests/s.
bench_wrk() {
    wrk -t2 -c100 -d"${DURATION}s" --latency "$1" 2>&1 | awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) } $1 == "Requests/sec:" { rps = $2 }
        END { printf "%.2f | %.2f | %.0f", p50, p99, rps }'
}
log "wrk: run record ($RUN_BYTES bytes), ci serve and nginx"
R_CI=$(bench_wrk "$URL/api/v1/runs/$RUN")
R_NGINX=$(bench_wrk "http://127.0.0.1:$NGINX_PORT/api/v1/runs/$RUN")
log "wrk: layer listing"
L_CI=$(bench_wrk "$URL/api/v1/layers/$LAYER/tree?recursive=true")
L_NGINX=$(bench_wrk "http://127.0.0.1:$NGINX_PORT/tree/listing")

log "event delay: a task prints its clock 200 times"
CLOCK=$(start_run '"//clock:clock"')
DELAY=$(python3 "$ROOT/bench/serve-clients.py" delay "$URL" "$CLOCK" "$WORK/go")

log "memory: $CLIENTS SSE clients on a live $TASKS-task run"
# A fresh store, so the run executes every task again.
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
rm -rf "$CI_STORE"
TOKEN=$(cd "$WS" && "$CI_BIN" serve token create bench)
start_server
RSS_IDLE=$(awk '/^VmRSS/ { print $2 }' "/proc/$SERVER_PID/status")
LIVE=$(start_run '"//:all"')
MANY=$(python3 "$ROOT/bench/serve-clients.py" many "$URL" "$LIVE" "$CLIENTS" | tail -1)
HWM=$(awk '/^VmHWM/ { print $2 }' "/proc/$SERVER_PID/status")
RSS_END=$(awk '/^VmRSS/ { print $2 }' "/proc/$SERVER_PID/status")
read -r ENDED MINEV MAXEV <<<"$MANY"
read -r NDELAY D50 D99 DMAX <<<"$DELAY"

cat <<TABLE
| what | ci serve p50 ms | p99 ms | req/s | nginx (static file) p50 ms | p99 ms | req/s |
|---|---|---|---|---|---|---|
| GET /api/v1/runs/{id} ($TASKS tasks, $RUN_BYTES bytes), 100 connections | ${R_CI//|/|} | ${R_NGINX//|/|} |
| GET layer listing (recursive), 100 connections | ${L_CI//|/|} | ${L_NGINX//|/|} |

| what | figure |
|---|---|
| engine event → SSE client, $NDELAY lines | p50 ${D50} ms, p99 ${D99} ms, max ${DMAX} ms |
| $CLIENTS SSE clients on a live $TASKS-task run | $ENDED of $CLIENTS got the \`end\`; events per client $MINEV–$MAXEV |
| server RSS: idle / peak / end | $((RSS_IDLE / 1024)) MiB / $((HWM / 1024)) MiB / $((RSS_END / 1024)) MiB |

machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r), filesystem $FSTYPE; ci $("$CI_BIN" --version)
TABLE
