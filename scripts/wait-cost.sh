#!/usr/bin/env bash
# wait-cost.sh - what the race-free wait (issue 11: a poll of the socket and the stop pipe
# before each read) costs the fork model on kept connections: loadgen persist c=10 against
# the seed's C server, the fork model of another checkout (OLD_SRC, e.g. a worktree of the
# commit before issue 11) and this one with the defences off, and this one again with the
# wait's poll removed (a throw-away copy made here), ROUNDS times interleaved.
#
#   OLD_SRC=/tmp/wt-old/src scripts/wait-cost.sh [ROUNDS]    (from the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH=${BENCH:-/tmp/fsbench}
PY="$ROOT/.venv/bin/python"
OLD_SRC=${OLD_SRC:?set OLD_SRC to another checkout\'s src directory}
NOPOLL=$(mktemp -d)
trap 'rm -rf "$NOPOLL"' EXIT
cp -r "$ROOT/src" "$NOPOLL/"
sed -i 's/self._waiter: Waiter | None = None if stop is None else stop.waiter(sock.fileno())/self._waiter: Waiter | None = None/' \
    "$NOPOLL/src/forkserve/serving/connection.py"
grep -q "self._waiter: Waiter | None = None$" "$NOPOLL/src/forkserve/serving/connection.py"
OFF="--first-byte-timeout 0 --max-startups off --max-startups-per-source 0 --penalties off"
OFF="$OFF --stress-idle-timeout 0 --stress-first-byte-timeout 0"
LIST=$(mktemp)
cat > "$LIST" <<LIST
seed_c|19711|$BENCH/anchors/seed_server_backlog128 PORT
fork_old|19712|env PYTHONPATH=$OLD_SRC $PY -m forkserve serve --bind 127.0.0.1:PORT --model fork
fork_without_poll|19713|env PYTHONPATH=$NOPOLL/src $PY -m forkserve serve --bind 127.0.0.1:PORT --model fork $OFF
fork_now|19714|$PY -m forkserve serve --bind 127.0.0.1:PORT --model fork $OFF
LIST
SERVERS_FILE="$LIST" MODE=persist BENCH="$BENCH" "$ROOT/scripts/conn-rate.sh" "${1:-3}"
rm -f "$LIST"
