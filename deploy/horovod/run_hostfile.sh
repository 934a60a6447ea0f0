#!/usr/bin/env bash
# Train across the machines of a hostfile with horovodrun + Gloo (no MPI needed).
#   HOSTFILE=deploy/horovod/hostfile deploy/horovod/run_hostfile.sh [train_radam.py options...]
#
# The hostfile has one "host slots=N" line per machine (see hostfile.example); NP defaults to
# the sum of the slots. Requirements on every host: passwordless ssh from this one, the same
# checkout path with the same .venv (Horovod built), and a shared folder for --checkpoint-dir
# (only rank 0 writes, every rank reads it when resuming).
# Env: HOSTFILE (required), NP, IFACE (network interface, e.g. eth0: pin it when hosts have
# several), SSH_PORT, PYTHON, SCRIPT.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${HOSTFILE:?set HOSTFILE to a file of 'host slots=N' lines}"
[[ -r "$HOSTFILE" ]] || { echo "cannot read HOSTFILE=$HOSTFILE" >&2; exit 1; }
SLOTS="$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n = a[2] } s += n } END { print s + 0 }' "$HOSTFILE")"
NP="${NP:-$SLOTS}"
(( NP >= 1 )) || { echo "no slots in $HOSTFILE" >&2; exit 1; }
PYTHON="${PYTHON:-$(pwd)/.venv/bin/python}"
SCRIPT="${SCRIPT:-$HERE/train_radam.py}"
HOROVODRUN="$(dirname "$PYTHON")/horovodrun"
[[ -x "$HOROVODRUN" ]] || HOROVODRUN="$(command -v horovodrun)" || {
    echo "horovodrun not found: run 'make horovod' first" >&2; exit 1; }
EXTRA=()
[[ -n "${IFACE:-}" ]] && EXTRA+=(--network-interface "$IFACE")
[[ -n "${SSH_PORT:-}" ]] && EXTRA+=(--ssh-port "$SSH_PORT")
exec "$HOROVODRUN" --gloo -np "$NP" --hostfile "$HOSTFILE" "${EXTRA[@]}" \
    "$PYTHON" "$SCRIPT" "$@"
