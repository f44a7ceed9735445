#!/usr/bin/env bash
# request-cost.sh - the CPU a kept connection's request costs the serving processes of a
# server (issue 16, phase 4): loadgen persist for 3 s at CONNS clients (default 10), then the
# CPU its children used (the reaper's cutime + cstime from /proc: the zygote's for the fork
# model, else the server's own) divided by the requests served.
#
#   scripts/request-cost.sh PORT fork|bare|fts      (BENCH: the built bench, /tmp/fsbench17)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/bench-lib.sh"
BENCH=${BENCH:-/tmp/fsbench17}
PORT=${1:?PORT}; WHO=${2:?fork, bare or fts}
PY="$ROOT/.venv/bin/python"
case $WHO in
    fork) setsid "$PY" -m forkserve serve --bind "127.0.0.1:$PORT" --model fork >/dev/null 2>&1 & ;;
    bare) setsid "$PY" "$ROOT/scripts/bare_fork.py" "$PORT" >/dev/null 2>&1 & ;;
    fts) setsid "$PY" "$BENCH/anchors/py_forking.py" "$PORT" >/dev/null 2>&1 & ;;
    *) echo "unknown server $WHO" >&2; exit 2 ;;
esac
pid=$!
wait_port "$PORT"
reaper=$pid
if [ "$WHO" = fork ]; then
    for child in $(cat "/proc/$pid/task/$pid/children"); do
        [ "$(cat "/proc/$child/comm")" = fs-zygote ] && reaper=$child
    done
fi
before=$(awk '{print $16 + $17}' "/proc/$reaper/stat")
out=$("$BENCH/loadgen" -p "$PORT" -c "${CONNS:-10}" -m persist -d 3 -w 0 2>/dev/null | head -1)
sleep 0.5  # the children reaped
after=$(awk '{print $16 + $17}' "/proc/$reaper/stat")
ticks=$(getconf CLK_TCK)
OUT="$out" python3 -c "
import json, os
d = json.loads(os.environ['OUT'])
print('$WHO', round(d['rps']), 'req/s,', round(($after - $before) / $ticks / (d['rps'] * 3) * 1e6, 2),
      'us of CPU a request in the children')"
kill -TERM -- "-$pid"; sleep 0.5; kill -KILL -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
