#!/usr/bin/env bash
# defence-cost.sh - what the defaults against silent clients (issue 12) cost well-behaved load:
# loadgen persist and connect, c=10, 3 s after 1 s of warm-up, for the fork and prefork models
# with the defaults and with every defence off, beside the seed's C server, ROUNDS times
# interleaved (the machine is shared: compare within a round). Runs scripts/conn-rate.sh.
#
#   scripts/defence-cost.sh [ROUNDS]     (from the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH=${BENCH:-/tmp/fsbench}
PY="$ROOT/.venv/bin/python"
OFF="--first-byte-timeout 0 --max-startups off --max-startups-per-source 0 --penalties off"
OFF="$OFF --stress-idle-timeout 0 --stress-first-byte-timeout 0"
LIST=$(mktemp)
trap 'rm -f "$LIST"' EXIT
cat > "$LIST" <<LIST
seed_c|19631|$BENCH/anchors/seed_server_backlog128 PORT
fork_defaults|19632|$PY -m forkserve serve --bind 127.0.0.1:PORT --model fork
fork_off|19633|$PY -m forkserve serve --bind 127.0.0.1:PORT --model fork $OFF
prefork_defaults|19634|$PY -m forkserve serve --bind 127.0.0.1:PORT --model prefork
prefork_off|19635|$PY -m forkserve serve --bind 127.0.0.1:PORT --model prefork $OFF
LIST
for mode in persist connect; do
    echo "== $mode"
    SERVERS_FILE="$LIST" MODE="$mode" BENCH="$BENCH" "$ROOT/scripts/conn-rate.sh" "${1:-3}"
done
