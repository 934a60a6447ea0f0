#!/usr/bin/env bash
# Train across the machines of a hostfile with Open MPI's mpirun (clusters, schedulers).
# Needs Horovod built WITH MPI: HOROVOD_WITH_MPI=1 deploy/horovod/build_horovod.sh
# (an MPI implementation with mpicxx on PATH; see docs/HOROVOD.md).
#   HOSTFILE=hosts deploy/horovod/run_mpirun.sh [train_radam.py options...]
# The hostfile uses Open MPI's syntax: "host slots=N" per line (same as horovodrun's).
# Env: HOSTFILE (required), NP (default: sum of slots), IFACE (TCP interface for MPI and
# Horovod), PYTHON, SCRIPT.
# (Equivalent: horovodrun --mpi -np NP --hostfile HOSTFILE python train_radam.py.)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${HOSTFILE:?set HOSTFILE to a file of 'host slots=N' lines}"
command -v mpirun >/dev/null || { echo "mpirun not found on PATH" >&2; exit 1; }
SLOTS="$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n = a[2] } s += n } END { print s + 0 }' "$HOSTFILE")"
NP="${NP:-$SLOTS}"
PYTHON="${PYTHON:-$(pwd)/.venv/bin/python}"
SCRIPT="${SCRIPT:-$HERE/train_radam.py}"
"$PYTHON" -c 'import horovod.tensorflow as hvd; assert hvd.mpi_built(), "Horovod was built without MPI"' || {
    echo "rebuild Horovod with MPI: HOROVOD_WITH_MPI=1 HOROVOD_FORCE_REBUILD=1 deploy/horovod/build_horovod.sh" >&2
    exit 1; }
MCA=(-mca pml ob1 -mca btl ^openib)
[[ -n "${IFACE:-}" ]] && MCA+=(-mca btl_tcp_if_include "$IFACE" -mca oob_tcp_if_include "$IFACE")
# -bind-to none: TensorFlow manages its own threads; -map-by slot: fill each host's slots in order.
exec mpirun -np "$NP" --hostfile "$HOSTFILE" -bind-to none -map-by slot \
    -x PATH -x LD_LIBRARY_PATH "${MCA[@]}" \
    "$PYTHON" "$SCRIPT" "$@"
