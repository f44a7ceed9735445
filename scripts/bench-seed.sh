#!/usr/bin/env bash
# bench-seed.sh - measure forkserve beside the seed's C server and socketserver.ForkingTCPServer
# in one run, with the shared harness (../shared/bench), ROUNDS interleaved rounds.
#
#   scripts/bench-seed.sh [ROUNDS] [SERVER...]      (from the repository root; default 3 rounds)
#
# Copies ../shared/bench to $BENCH (default /tmp/fsbench), builds it, runs each server through
# run.sh, and prints compare.py's medians. Results: $BENCH/results/*.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH=${BENCH:-/tmp/fsbench}
ROUNDS=${1:-3}
shift $(( $# > 0 ? 1 : 0 ))
if [ ! -x "$BENCH/loadgen" ]; then
    rm -rf "$BENCH" && cp -r "$ROOT/../shared/bench" "$BENCH" && chmod -R u+w "$BENCH"
    make -s -C "$BENCH"
fi
# FS and PY may be given (e.g. FS="env PYTHONPATH=/clone/src .venv/bin/python -m forkserve" to
# measure a checkout that is not the one installed in the environment)
FS=${FS:-"$ROOT/.venv/bin/forkserve"}
PY=${PY:-"$ROOT/.venv/bin/python"}
# name | port | run.sh options | command (PORT is substituted)
SERVERS=(
    "seed_c_backlog128|19201|-q|$BENCH/anchors/seed_server_backlog128 PORT"
    "py_forking|19202||$PY $BENCH/anchors/py_forking.py PORT"
    "forkserve_fork|19203||$FS serve --bind 127.0.0.1:PORT --model fork"
    "forkserve_fork_mc1024|19204||$FS serve --bind 127.0.0.1:PORT --model fork --max-children 1024"
    "forkserve_single|19205||$FS serve --bind 127.0.0.1:PORT --model single"
    "forkserve_prefork|19206||$FS serve --bind 127.0.0.1:PORT --model prefork"
)
for r in $(seq 1 "$ROUNDS"); do
    for s in "${SERVERS[@]}"; do
        IFS='|' read -r name port opts cmd <<<"$s"
        if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
        # shellcheck disable=SC2086
        "$BENCH/run.sh" $opts -t "r$r" "$name" "$port" -- ${cmd//PORT/$port} >/dev/null || true
        echo "round $r: $name done"
    done
done
python3 "$BENCH/compare.py" "$BENCH/results/"
