#!/usr/bin/env bash
# forkserve exec beside tcpserver and socat, all running the same C program per connection
# (bench/anchors/hello: one "Hello from server!\n" per line read from stdin). 3 interleaved
# rounds of connect_c10 and persist_c10 on loopback. Run from the forkserve worktree:
#   docs/bench/issue4-exec/bench.sh /tmp/fsbench-exec
set -euo pipefail
B=${1:-/tmp/fsbench-exec}
HELLO=$B/anchors/hello
PY=${PY:-/work/main/.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD/src}
export RESULTS_DIR=${RESULTS_DIR:-$B/results-exec}
for r in 1 2 3; do
  "$B/run.sh" -s "connect_c10 persist_c10" -t "r$r" forkserve_exec 19401 -- \
    "$PY" -m forkserve exec --bind 127.0.0.1:19401 --max-children 256 -- "$HELLO"
  "$B/run.sh" -s "connect_c10 persist_c10" -t "r$r" forkserve_exec_quiet 19402 -- \
    "$PY" -m forkserve exec --bind 127.0.0.1:19402 --max-children 256 --log-level warning -- "$HELLO"
  "$B/run.sh" -s "connect_c10 persist_c10" -t "r$r" tcpserver 19403 -- \
    tcpserver -H -R -l 0 -c 256 -b 128 127.0.0.1 19403 "$HELLO"
  "$B/run.sh" -s "connect_c10 persist_c10" -t "r$r" socat 19404 -- \
    socat TCP-LISTEN:19404,reuseaddr,fork,backlog=128 EXEC:"$HELLO"
done
python3 "$B/compare.py" "$RESULTS_DIR"
