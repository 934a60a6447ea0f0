#!/usr/bin/env bash
# Train across the machines of a hostfile with Open MPI's mpirun (clusters, schedulers).
# Needs Horovod built WITH MPI (`make horovod` does it where Open MPI can be installed; by
# hand: HOROVOD_WITH_MPI=1 HOROVOD_FORCE_REBUILD=1 deploy/horovod/build_horovod.sh).
#   HOSTFILE=hosts deploy/horovod/run_mpirun.sh [train_radam.py options...]
#   HOSTFILE=hosts MPIRUN_ARGS="--tag-output -x NCCL_DEBUG" deploy/horovod/run_mpirun.sh --epochs 20
# The hostfile uses Open MPI's syntax: "host slots=N" per line (same as horovodrun's).
# Env: HOSTFILE (required), NP (default: sum of slots), IFACE (TCP interface for MPI's
#      traffic, e.g. eth0 or ib0), MPIRUN_ARGS (extra mpirun flags, split on spaces, placed
#      before the program), PYTHON, SCRIPT (default train_radam.py).
# As root (containers, CI) Open MPI refuses to start unless told twice that it is meant:
# this script sets OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 when it
# runs as root (the same as mpirun --allow-run-as-root).
# (Equivalent: horovodrun --mpi -np NP --hostfile HOSTFILE python train_radam.py.)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${HOSTFILE:?set HOSTFILE to a file of 'host slots=N' lines}"
[[ -r "$HOSTFILE" ]] || { echo "cannot read HOSTFILE '$HOSTFILE'" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "mpirun not found on PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
SLOTS="$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n = a[2] } s += n } END { print s + 0 }' "$HOSTFILE")"
NP="${NP:-$SLOTS}"
PYTHON="${PYTHON:-$(pwd)/.venv/bin/python}"
SCRIPT="${SCRIPT:-$HERE/train_radam.py}"
read -r -a EXTRA <<<"${MPIRUN_ARGS:-}"

# Built with MPI? Horovod's TensorFlow extension links libmpi then. Read that from the
# library itself: importing horovod.tensorflow would import TensorFlow (seconds) for nothing.
HVD_DIR="$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("horovod"); print(s.submodule_search_locations[0] if s else "")')"
[[ -n "$HVD_DIR" ]] || { echo "$PYTHON has no horovod: run make horovod (see docs/HOROVOD.md)" >&2; exit 1; }
shopt -s nullglob
LIBS=("$HVD_DIR"/tensorflow/mpi_lib*.so)
LINKED="$([[ ${#LIBS[@]} -gt 0 ]] && ldd "${LIBS[0]}" 2>/dev/null || true)"
if [[ "$LINKED" != *libmpi.so* ]]; then
    echo "Horovod in $PYTHON was built without MPI; rebuild it with MPI:" >&2
    echo "  HOROVOD_WITH_MPI=1 HOROVOD_FORCE_REBUILD=1 deploy/horovod/build_horovod.sh $PYTHON" >&2
    exit 1
fi

if [[ "$(id -u)" == "0" ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
MCA=(-mca pml ob1 -mca btl ^openib)
[[ -n "${IFACE:-}" ]] && MCA+=(-mca btl_tcp_if_include "$IFACE" -mca oob_tcp_if_include "$IFACE")
# Forward PATH (and LD_LIBRARY_PATH only when it is set: -x of an unset variable warns).
EXPORTS=(-x PATH)
[[ -n "${LD_LIBRARY_PATH:-}" ]] && EXPORTS+=(-x LD_LIBRARY_PATH)
# -bind-to none: TensorFlow manages its own threads; -map-by slot: fill each host's slots in order.
exec mpirun -np "$NP" --hostfile "$HOSTFILE" -bind-to none -map-by slot \
    "${EXPORTS[@]}" "${MCA[@]}" ${EXTRA[@]+"${EXTRA[@]}"} \
    "$PYTHON" "$SCRIPT" "$@"
