#!/usr/bin/env bash
# defence-cost.sh - what the defaults against silent clients (issue 12) cost well-behaved load:
# loadgen persist and connect, c=10, 3 s after 1 s of warm-up, for the fork and prefork models
# with the defaults and with every defence off, beside the seed's C server, ROUNDS times
# interleaved (the machine is shared: compare within a round).
#
#   scripts/defence-cost.sh [ROUNDS]     (from the repository root; the bench is built as by
#                                          conn-rate.sh, in $BENCH, default /tmp/fsbench)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH=${BENCH:-/tmp/fsbench}
ROUNDS=${1:-3}
if [ ! -x "$BENCH/loadgen" ]; then
    rm -rf "$BENCH" && cp -r "$ROOT/../shared/bench" "$BENCH" && chmod -R u+w "$BENCH"
    make -s -C "$BENCH"
fi
PY="$ROOT/.venv/bin/python"
OFF="--first-byte-timeout 0 --max-startups off --max-startups-per-source 0 --penalties off"
OFF="$OFF --stress-idle-timeout 0 --stress-first-byte-timeout 0"
SERVERS=(
    "seed_c|19631|$BENCH/anchors/seed_server_backlog128 PORT"
    "fork_defaults|19632|$PY -m forkserve serve --bind 127.0.0.1:PORT --model fork"
    "fork_off|19633|$PY -m forkserve serve --bind 127.0.0.1:PORT --model fork $OFF"
    "prefork_defaults|19634|$PY -m forkserve serve --bind 127.0.0.1:PORT --model prefork"
    "prefork_off|19635|$PY -m forkserve serve --bind 127.0.0.1:PORT --model prefork $OFF"
)
measure() {  # MODE NAME PORT CMD...
    local mode=$1 name=$2 port=$3; shift 3
    setsid "$@" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
        timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && break
        sleep 0.05
    done
    "$BENCH/loadgen" -p "$port" -m "$mode" -c 10 -d 3 -w 1 2>/dev/null \
        | python3 -c "import json,sys; d=json.loads(sys.stdin.readline());
print(f'$mode $name: {d[\"rps\"]:,.0f}/s, errors {d[\"errors\"]}, timeouts {d[\"timeouts\"]}')"
    kill -TERM -- "-$pid" 2>/dev/null || true
    sleep 0.5
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r"
    for mode in persist connect; do
        for s in "${SERVERS[@]}"; do
            IFS='|' read -r name port cmd <<<"$s"
            # shellcheck disable=SC2086
            measure "$mode" "$name" "$port" ${cmd//PORT/$port}
        done
    done
done
