#!/usr/bin/env bash
# Start a sample 5-node grid on 127.0.0.1 and stay in the foreground until Ctrl-C / SIGTERM.
#
#   n1 plant       tcp://127.0.0.1:BASE+1   production 50, dispatchable: can go 20 kW up
#                                           (at 0.12/kWh) or 30 kW down (saving 0.03/kWh)
#   n2 solar house tcp://127.0.0.1:BASE+2   production 6, consumption 2.5
#   n3 house       tcp://127.0.0.1:BASE+3   consumption 3.2
#   n4 factory     tcp://127.0.0.1:BASE+4   consumption 38
#   n5 battery     tcp://127.0.0.1:BASE+5   a device model (examples/devices/battery.toml):
#                                           10 kWh, 5 kW, cheaper than n1 both ways
#
# Wired as a ring n1-n2-n3-n4-n1 plus the chord n1-n3, and n5 on n4 and n1. BASE is
# ZGRID_BASE_PORT (default 5000). Each node keeps its state under ZGRID_DATA (default
# ./.zgrid/run-BASE); logs go to ZGRID_LOGS (default DATA/logs). A node with saved state
# resumes it, siblings and unlinks included (nothing but its id, endpoint and data dir is passed
# again); `run.sh --fresh` (make reset) deletes the five nodes' saved state first.
#
# Prints one line each time a node's view changes: the island's total and, as n5 and n1
# balance it (Phase II), the imbalance before, the net after and the node's own activation.
# A watcher follows its node through a restart or a freeze; a node that exits is reported
# with the command that starts it again; the script ends when every node has.
set -euo pipefail

fresh=0
case "${1:-}" in
    --fresh) fresh=1 ;;
    "") ;;
    *) echo "usage: $0 [--fresh]   (--fresh: forget the saved grid and start the demo anew)" >&2
       exit 2 ;;
esac

base=${ZGRID_BASE_PORT:-5000}
data=${ZGRID_DATA:-.zgrid/run-$base}
logs=${ZGRID_LOGS:-$data/logs}
host=127.0.0.1
root=$(cd "$(dirname "$0")/.." && pwd)
battery=$root/examples/devices/battery.toml
ids=(n1 n2 n3 n4 n5)
ep() { echo "tcp://$host:$((base + $1))"; }

command -v zgrid-node >/dev/null || { echo "zgrid-node not on PATH (run: make run)" >&2; exit 2; }

# Something listening on one of our ports: most likely the grid is running already.
for i in 1 2 3 4 5; do
    if (: <>"/dev/tcp/$host/$((base + i))") 2>/dev/null; then
        echo "port $((base + i)) on $host is in use: is the grid running already? Stop it" \
             "first (Ctrl-C in its terminal), or use another ZGRID_BASE_PORT" >&2
        exit 2
    fi
done
if [ "$fresh" = 1 ]; then
    for id in "${ids[@]}"; do rm -rf "${data:?}/$id" "${logs:?}/$id.log"; done
    echo "forgot the saved grid in $data: starting afresh"
fi
mkdir -p "$logs"
data_abs=$(cd "$data" && pwd)
logs_abs=$(cd "$logs" && pwd)

pids=()
watchers=()
commands=()
resumed=()
stop() {
    trap - INT TERM
    local live=()
    for pid in ${watchers[@]+"${watchers[@]}"} ${pids[@]+"${pids[@]}"}; do
        [ -n "$pid" ] && live+=("$pid")
    done
    [ ${#live[@]} -gt 0 ] && kill -TERM "${live[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    echo "grid stopped"
    exit 0
}
trap stop INT TERM

start() {  # start INDEX PRODUCTION CONSUMPTION OPTIONS SIBLING_INDEX...  (PRODUCTION -: none)
    local i=$1 p=$2 c=$3 options=$4
    local id=${ids[$((i - 1))]}
    shift 4
    local cmd=(zgrid-node --id "$id" --bind "$(ep "$i")" --data-dir "$data_abs/$id")
    # shellcheck disable=SC2206  # OPTIONS is a list of options, split on purpose
    local initial=($options)
    if [ ${#initial[@]} -gt 0 ] && [ "${initial[0]}" = --device ]; then
        cmd+=("${initial[@]}")  # a device model is not saved state: it is given every time
        initial=()
    fi
    # How to start it again once it has run: its saved state has the rest.
    commands[i]="${cmd[*]} 2>>$logs_abs/$id.log"
    if [ -f "$data_abs/$id/state.sqlite3" ]; then
        resumed+=("$id")  # its saved values, offer, siblings and unlinks are the user's
    else
        [ "$p" = - ] || cmd+=(--production "$p" --consumption "$c")  # -: the device's own
        cmd+=(${initial[@]+"${initial[@]}"})
        for j in "$@"; do cmd+=(--sibling "$(ep "$j")"); done
    fi
    "${cmd[@]}" 2>>"$logs/$id.log" &
    pids[i]=$!
}

start 1 50 0 "--flex-up 20 --price-up 0.12 --flex-down 30 --price-down 0.03"
start 2 6 2.5 "" 1
start 3 0 3.2 "" 2 1
start 4 0 38 "" 3 1
start 5 - - "--device $battery" 4 1

# Wait (bounded) until every node answers, so the first status lines are real.
for i in 1 2 3 4 5; do
    for _ in $(seq 50); do
        zgrid-ctl --node "$(ep "$i")" --timeout 0.2 status >/dev/null 2>&1 && break
        sleep 0.1
    done
done

if [ ${#resumed[@]} -gt 0 ]; then
    resume_note="resumed the grid saved in $data (${resumed[*]}): as you left it; make reset starts afresh"
else
    resume_note="a new grid, saved in $data: the next make run resumes it; make reset starts afresh"
fi
profile=examples/profiles/demo_day.csv
[ "$PWD" = "$root" ] || profile=$root/$profile
cat <<TXT
zgrid: 5 nodes running (logs in $logs/)
  n1 plant        $(ep 1)  pid ${pids[1]}
  n2 solar house  $(ep 2)  pid ${pids[2]}
  n3 house        $(ep 3)  pid ${pids[3]}
  n4 factory      $(ep 4)  pid ${pids[4]}
  n5 battery      $(ep 5)  pid ${pids[5]}
$resume_note
Try, in another terminal:
  export ZGRID_NODE=$(ep 1)
  zgrid-ctl status
  zgrid-ctl nodes
  zgrid-ctl --node $(ep 4) set --consumption 60    # a deficit: n5 discharges, n1 the rest
  zgrid-ctl --node $(ep 1) flex --down 0            # n1 cannot turn down: a shortfall
  zgrid-ctl play --speed 60 $profile   # a day of loads in 24 minutes
  zgrid-ctl unlink n2 ; zgrid-ctl link $(ep 2)
  zgrid-ctl watch
  zgrid-ctl top                                     # the island, live, full screen
  zgrid-ctl --node $(ep 5) dashboard --open         # the grid in a browser (needs zgrid[web])
Ctrl-C stops the grid.
TXT

for i in 1 2 3 4 5; do
    zgrid-ctl --node "$(ep "$i")" watch --follow &
    watchers+=($!)
done

# Report each node that exits (the rest go on); end once every node has.
running=5
while [ "$running" -gt 0 ]; do
    for i in 1 2 3 4 5; do
        pid=${pids[i]}
        if [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null; then continue; fi
        status=0
        wait "$pid" || status=$?
        pids[i]=""
        running=$((running - 1))
        how="exited with status $status"
        [ "$status" -gt 128 ] && how="was killed by signal $((status - 128))"
        echo "$(date +%H:%M:%S) ${ids[$((i - 1))]} (pid $pid) $how; to start it again:"
        echo "  ${commands[i]}"
    done
    sleep 0.5 &   # the monitor's pace, not a synchronisation: traps run as soon as it ends
    wait $! 2>/dev/null || true
done
stop
