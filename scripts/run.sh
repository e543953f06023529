#!/usr/bin/env bash
# Start a sample 4-node grid on 127.0.0.1 and stay in the foreground until Ctrl-C / SIGTERM.
#
#   n1 plant       tcp://127.0.0.1:BASE+1   production 50, dispatchable: can go 20 kW up
#                                           (at 0.12/kWh) or 30 kW down (saving 0.03/kWh)
#   n2 solar house tcp://127.0.0.1:BASE+2   production 6, consumption 2.5
#   n3 house       tcp://127.0.0.1:BASE+3   consumption 3.2
#   n4 factory     tcp://127.0.0.1:BASE+4   consumption 38
#
# Wired as a ring n1-n2-n3-n4-n1 plus the chord n1-n3. BASE is ZGRID_BASE_PORT (default 5000).
# Each node keeps its state under ZGRID_DATA (default ./.zgrid); logs go to ZGRID_LOGS
# (default ./.zgrid/logs). Prints one line each time a node's view changes: the island's total
# and, as n1 balances it (Phase II), the imbalance before and the net after balancing.
set -euo pipefail

base=${ZGRID_BASE_PORT:-5000}
data=${ZGRID_DATA:-.zgrid/run-$base}
logs=${ZGRID_LOGS:-$data/logs}
host=127.0.0.1
ep() { echo "tcp://$host:$((base + $1))"; }

command -v zgrid-node >/dev/null || { echo "zgrid-node not on PATH (run: make run)" >&2; exit 2; }
mkdir -p "$logs"

pids=()
watchers=()
stop() {
    trap - INT TERM
    [ ${#watchers[@]} -gt 0 ] && kill "${watchers[@]}" 2>/dev/null || true
    [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    echo "grid stopped"
    exit 0
}
trap stop INT TERM

start() {  # start ID INDEX PRODUCTION CONSUMPTION FLEX_ARGS SIBLING_INDEX...
    local id=$1 i=$2 p=$3 c=$4 flex=$5
    shift 5
    local sib=()
    for j in "$@"; do sib+=(--sibling "$(ep "$j")"); done
    # shellcheck disable=SC2086  # FLEX_ARGS is a list of options, split on purpose
    zgrid-node --id "$id" --bind "$(ep "$i")" --production "$p" --consumption "$c" $flex \
        --data-dir "$data/$id" "${sib[@]}" 2>"$logs/$id.log" &
    pids+=($!)
}

start n1 1 50 0 "--flex-up 20 --price-up 0.12 --flex-down 30 --price-down 0.03"
start n2 2 6 2.5 "" 1
start n3 3 0 3.2 "" 2 1
start n4 4 0 38 "" 3 1

# Wait (bounded) until every node answers, so the first status lines are real.
for i in 1 2 3 4; do
    for _ in $(seq 50); do
        zgrid-ctl --node "$(ep "$i")" --timeout 0.2 status >/dev/null 2>&1 && break
        sleep 0.1
    done
done

cat <<TXT
zgrid: 4 nodes running (logs in $logs/)
  n1 plant        $(ep 1)
  n2 solar house  $(ep 2)
  n3 house        $(ep 3)
  n4 factory      $(ep 4)
Try, in another terminal:
  export ZGRID_NODE=$(ep 1)
  zgrid-ctl status
  zgrid-ctl nodes
  zgrid-ctl --node $(ep 3) set --consumption 7.5   # n1 then raises its output to match
  zgrid-ctl --node $(ep 1) flex --down 0            # n1 stops turning down: a surplus
  zgrid-ctl unlink n2 ; zgrid-ctl link $(ep 2)
  zgrid-ctl watch
Ctrl-C stops the grid.
TXT

for i in 1 2 3 4; do
    zgrid-ctl --node "$(ep "$i")" watch &
    watchers+=($!)
done
wait "${pids[@]}" || true
stop
