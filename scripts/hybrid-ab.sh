#!/usr/bin/env bash
# hybrid-ab.sh - the hybrid model before and after a change, beside the single-process
# asyncio+uvloop anchor and the seed's C server, ROUNDS interleaved rounds of one loadgen
# scenario (each: a fresh server, 1 s to settle, `loadgen -d 3 -w 1`, then SIGTERM to its
# session). One line per run: round, server, req/s, timeouts, errors, p99 (us).
#
#   OLD_SRC=/tmp/wt-old/src scripts/hybrid-ab.sh ROUNDS MODE CONNS [LOADGEN ARGS...]
#   e.g. git worktree add /tmp/wt-old <commit>; OLD_SRC=/tmp/wt-old/src \
#        scripts/hybrid-ab.sh 3 connect 10
#
# KIND=fork or KIND=exec measures that forkserve model instead of the hybrid one (exec runs
# `sed -u 's/.*/Hello from server!/'` per connection); HYBRID_ARGS adds options. SERVERS picks
# who runs, in order, from old, new, uv (asyncio+uvloop), seed (the C server) and tcpserver
# (ucspi-tcp running the same sed: the anchor of a program per connection), e.g.
#   KIND=exec SERVERS="old new tcpserver" OLD_SRC=/tmp/old/src scripts/hybrid-ab.sh 3 connect 10
#
# The bench is built in $BENCH (default /tmp/fsbench17: cp -r ../shared/bench /tmp/fsbench17
# && make -C /tmp/fsbench17, and its .venv with uvloop for the anchor, see its README).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/bench-lib.sh"
BENCH=${BENCH:-/tmp/fsbench17}
ROUNDS=${1:?ROUNDS}; MODE=${2:?MODE}; CONNS=${3:?CONNS}; shift 3
PORT=${PORT:-19311}
PY="$ROOT/.venv/bin/python"
HELLO_SED='s/.*/Hello from server!/'
read -r -a EXTRA <<< "${HYBRID_ARGS:-}"
case ${KIND:-hybrid} in
    exec) HYBRID=(-m forkserve exec --bind "127.0.0.1:$PORT" "${EXTRA[@]}" -- sed -u "$HELLO_SED") ;;
    *) HYBRID=(-m forkserve serve --bind "127.0.0.1:$PORT" --model "${KIND:-hybrid}" "${EXTRA[@]}") ;;
esac
for r in $(seq 1 "$ROUNDS"); do
    for who in ${SERVERS:-old new uv seed}; do
        case $who in
            old) PYTHONPATH=${OLD_SRC:?OLD_SRC} setsid $PY "${HYBRID[@]}" >/dev/null 2>&1 & ;;
            new) PYTHONPATH=$ROOT/src setsid $PY "${HYBRID[@]}" >/dev/null 2>&1 & ;;
            tcpserver) setsid tcpserver -H -R -l 0 -c 1024 127.0.0.1 "$PORT" \
                           sed -u "$HELLO_SED" >/dev/null 2>&1 & ;;
            uv) setsid "$BENCH/.venv/bin/python" "$BENCH/anchors/py_asyncio.py" "$PORT" \
                    --uvloop >/dev/null 2>&1 & ;;
            seed) setsid "$BENCH/anchors/seed_server_backlog128" "$PORT" >/dev/null 2>&1 & ;;
        esac
        pid=$!
        wait_port "$PORT"
        out=$("$BENCH/loadgen" -p "$PORT" -c "$CONNS" -m "$MODE" -d 3 -w 1 "$@" 2>/dev/null)
        echo "$r $who $(echo "$out" | head -1 | python3 -c 'import json, sys
d = json.loads(sys.stdin.readline())
print(d["rps"], d["timeouts"], d["errors"], d["p99_us"])')"
        kill -TERM -- -$pid 2>/dev/null; sleep 0.7; kill -KILL -- -$pid 2>/dev/null
        wait $pid 2>/dev/null
    done
done
