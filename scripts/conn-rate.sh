#!/usr/bin/env bash
# conn-rate.sh - new connections a second (loadgen -m connect -c 10, 3 s after 1 s of warm-up)
# of a few servers, one after the other, ROUNDS times: a quick check of the fork and prefork
# models beside the seed's C server, socketserver.ForkingTCPServer and a bare Python pre-fork
# loop (scripts/bare_prefork.py); for the full picture: bench-seed.sh.
#
#   scripts/conn-rate.sh [ROUNDS]        (from the repository root; the bench is built as by
#                                          bench-seed.sh, in $BENCH, default /tmp/fsbench)
#   MODE=persist scripts/conn-rate.sh    (requests a second on 10 kept connections instead)
#   SERVERS_FILE=list scripts/conn-rate.sh  (other servers: lines NAME|PORT|CMD)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH=${BENCH:-/tmp/fsbench}
ROUNDS=${1:-2}
if [ ! -x "$BENCH/loadgen" ]; then
    rm -rf "$BENCH" && cp -r "$ROOT/../shared/bench" "$BENCH" && chmod -R u+w "$BENCH"
    make -s -C "$BENCH"
fi
PY="$ROOT/.venv/bin/python"
SERVERS=(
    "seed_c|19621|$BENCH/anchors/seed_server_backlog128 PORT"
    "py_forking|19622|$PY $BENCH/anchors/py_forking.py PORT"
    "forkserve_fork|19623|$PY -m forkserve serve --bind 127.0.0.1:PORT --model fork"
    "bare_prefork|19624|$PY $ROOT/scripts/bare_prefork.py PORT 4"
    "forkserve_prefork|19625|$PY -m forkserve serve --bind 127.0.0.1:PORT --model prefork"
)
# SERVERS_FILE: lines NAME|PORT|CMD (PORT in CMD is replaced) instead of the list above
if [ -n "${SERVERS_FILE:-}" ]; then
    mapfile -t SERVERS < "$SERVERS_FILE"
fi
MODE=${MODE:-connect}
rate() {  # NAME PORT CMD...: start CMD in its own session, measure, stop the session
    local name=$1 port=$2; shift 2
    setsid "$@" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
        timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && break
        sleep 0.05
    done
    "$BENCH/loadgen" -p "$port" -m "$MODE" -c 10 -d 3 -w 1 2>/dev/null \
        | python3 -c "import json,sys; d=json.loads(sys.stdin.readline());
print(f'$name: {d[\"rps\"]:,.0f}/s, errors {d[\"errors\"]}, timeouts {d[\"timeouts\"]}')"
    kill -TERM -- "-$pid" 2>/dev/null || true
    sleep 0.5
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r"
    for s in "${SERVERS[@]}"; do
        IFS='|' read -r name port cmd <<<"$s"
        # shellcheck disable=SC2086
        rate "$name" "$port" ${cmd//PORT/$port}
    done
done
