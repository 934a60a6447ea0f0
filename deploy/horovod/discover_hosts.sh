#!/usr/bin/env bash
# Host discovery for elastic Horovod: print the hosts that may run workers now, one
# "hostname:slots" per line. horovodrun calls it about once a second; edit HOSTS_FILE to
# add or remove hosts while the job runs (a scheduler would print its allocation instead).
#   HOSTS_FILE=hosts.txt deploy/horovod/discover_hosts.sh
set -euo pipefail
: "${HOSTS_FILE:?set HOSTS_FILE to a file of 'hostname:slots' lines}"
grep -vE '^[[:space:]]*(#|$)' "$HOSTS_FILE" || true
