#!/usr/bin/env bash
# zygote-bench.sh - issue 16's measuring run: the zygote's shapes (scripts/zygote_proto.py),
# the real zygote behind a minimal master (scripts/zygote_master.py: zreal), the fork model
# and the anchors (the seed's C server, socketserver.ForkingTCPServer, the bare Python fork
# loop scripts/bare_fork.py) through the bench's run.sh, ROUNDS interleaved rounds.
#
#   scripts/zygote-bench.sh ROUNDS OUT [SCENARIOS]    (from the repository root)
#   SERVERS="seed_c bare_fork ..." scripts/zygote-bench.sh ...   (a subset of the list below)
#   OLDFORK_SRC=/tmp/oldfork/src SERVERS="... oldfork" ...   (the fork model of another
#       checkout, e.g. `git worktree add /tmp/oldfork <commit>`: before and after, one run)
#   FIRST_ROUND=3 scripts/zygote-bench.sh 2 OUT ...   (rounds r3 and r4 into the same OUT: e.g.
#       a second call with SERVERS in the reverse order, so a load that rises or falls
#       during a run does not favour the same server in every round)
#   NEWFORK_SRC=/tmp/newfork/src SERVERS="... newfork" ...   (the same, a second one: e.g.
#       `git archive HEAD src | tar -x -C /tmp/newfork`, so edits during the run do not count)
#
# The bench is built in $BENCH (default /tmp/fsbench-d); records go to OUT/NAME.jsonl, then
# scripts/zygote_table.py OUT prints the medians and ratios.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH=${BENCH:-/tmp/fsbench-d}
ROUNDS=${1:?ROUNDS}
OUT=${2:?OUT}
SCEN=${3:-persist_c10 persist_c100 connect_c10 persist_c1000}
PY="$ROOT/.venv/bin/python"
declare -A CMDS=(
    [seed_c]="$BENCH/anchors/seed_server_backlog128 PORT"
    [py_forking]="$PY $BENCH/anchors/py_forking.py PORT"
    [bare_fork]="$PY $ROOT/scripts/bare_fork.py PORT"
    [fork]="$PY -m forkserve serve --bind 127.0.0.1:PORT --model fork --max-children 1024"
    [zaccept]="$PY $ROOT/scripts/zygote_proto.py zaccept PORT"
    [mpass]="$PY $ROOT/scripts/zygote_proto.py mpass PORT"
    [zspare]="$PY $ROOT/scripts/zygote_proto.py zspare PORT"
    [mspare]="$PY $ROOT/scripts/zygote_proto.py mspare PORT"
    [zreal]="$PY $ROOT/scripts/zygote_master.py PORT"
    [zspares]="$PY $ROOT/scripts/zygote_master.py PORT --spares ${SPARES:-10}"
    [oldfork]="env PYTHONPATH=${OLDFORK_SRC:-/nonexistent} $PY -m forkserve serve --bind 127.0.0.1:PORT --model fork --max-children 1024"
    [newfork]="env PYTHONPATH=${NEWFORK_SRC:-/nonexistent} $PY -m forkserve serve --bind 127.0.0.1:PORT --model fork --max-children 1024"
)
ORDER=${SERVERS:-seed_c py_forking bare_fork fork zaccept mpass zspare mspare}
port=19800
FIRST=${FIRST_ROUND:-1}
for r in $(seq "$FIRST" $((FIRST + ROUNDS - 1))); do
    for name in $ORDER; do
        port=$((port + 1))
        # shellcheck disable=SC2086
        RESULTS_DIR="$OUT" "$BENCH/run.sh" -q -s "$SCEN" -t "r$r" "$name" "$port" -- \
            ${CMDS[$name]//PORT/$port} > /dev/null
        echo "round $r $name done $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    done
done
