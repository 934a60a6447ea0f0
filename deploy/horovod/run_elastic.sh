#!/usr/bin/env bash
# Elastic training: workers may die or join while the job runs; it continues with between
# MIN_NP and MAX_NP workers, from the last commit (see docs/HOROVOD.md, "Elastic").
#   HOSTS_FILE=hosts.txt MIN_NP=1 MAX_NP=4 deploy/horovod/run_elastic.sh [script options...]
# Env: HOSTS_FILE   "hostname:slots" lines, read by DISCOVERY (default discover_hosts.sh);
#      DISCOVERY    your own host-discovery script instead (prints "hostname:slots" lines);
#      NP           workers to start with (default: MIN_NP); MIN_NP (default 1);
#      MAX_NP       (default: NP);
#      IFACE        network interface the hosts reach each other on (eth0, ib0, ...);
#                   default "lo" when every discovered host resolves to a loopback address.
#                   Horovod needs it: without it a start on one machine waits the whole
#                   ELASTIC_TIMEOUT and fails;
#      ELASTIC_TIMEOUT  seconds to wait for MIN_NP workers (default 600);
#      HOROVODRUN_ARGS  extra horovodrun flags, split on spaces (e.g. "--blacklist-cooldown-range 10 100");
#      PYTHON, SCRIPT (default train_elastic.py).
# A host whose worker fails is blacklisted for the rest of the job (unless
# --blacklist-cooldown-range is given): with a single host name, one failure ends the job.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DISCOVERY="${DISCOVERY:-$HERE/discover_hosts.sh}"
[[ -x "$DISCOVERY" ]] || { echo "DISCOVERY '$DISCOVERY' is not an executable script" >&2; exit 1; }
if [[ "$DISCOVERY" == "$HERE/discover_hosts.sh" ]]; then
    : "${HOSTS_FILE:?set HOSTS_FILE to a file of 'hostname:slots' lines (or DISCOVERY to your script)}"
    HOSTS_FILE="$(cd "$(dirname "$HOSTS_FILE")" && pwd)/$(basename "$HOSTS_FILE")"
    export HOSTS_FILE
fi
MIN_NP="${MIN_NP:-1}"
NP="${NP:-$MIN_NP}"
MAX_NP="${MAX_NP:-$NP}"
PYTHON="${PYTHON:-$(pwd)/.venv/bin/python}"
SCRIPT="${SCRIPT:-$HERE/train_elastic.py}"
read -r -a EXTRA <<<"${HOROVODRUN_ARGS:-}"
if [[ -z "${IFACE:-}" ]]; then
    all_loopback=1
    while read -r line; do
        host="${line%%:*}"
        [[ -z "$host" ]] && continue
        addr="$(getent hosts "$host" | awk '{ print $1; exit }')"
        [[ "$addr" == 127.* || "$addr" == "::1" ]] || all_loopback=0
    done < <("$DISCOVERY")
    if [[ $all_loopback == 1 ]]; then
        IFACE=lo
    else
        echo "set IFACE to the network interface the hosts reach each other on (e.g. eth0)" >&2
        exit 1
    fi
fi
exec "$(dirname "$PYTHON")/horovodrun" -np "$NP" --min-np "$MIN_NP" --max-np "$MAX_NP" \
    --host-discovery-script "$DISCOVERY" --network-interface "$IFACE" \
    --elastic-timeout "${ELASTIC_TIMEOUT:-600}" ${EXTRA[@]+"${EXTRA[@]}"} \
    "$PYTHON" "$SCRIPT" "$@"
