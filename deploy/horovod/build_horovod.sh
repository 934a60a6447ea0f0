#!/usr/bin/env bash
# Build Horovod 0.28.1 from source (no wheel exists for TF 2.21 / Python 3.11)
# with TensorFlow + Gloo (+ MPI, see HOROVOD_WITH_MPI) into the given virtualenv python
# (default .venv/bin/python).
#
# Why the extra steps: Horovod 0.28.1 predates TF 2.21. TF's wheel ships the headers
# Horovod needs, but two of them live under external/ folders that TF's
# compile flags do not list, and Horovod's sources still include the old XLA
# path tensorflow/compiler/xla/client/xla_builder.h (moved to xla/hlo/builder/).
#
# Usage:  deploy/horovod/build_horovod.sh [PYTHON]
# Env:    HOROVOD_WITH_MPI=1     build the MPI controller too; fail if mpicxx is missing
#                                (an MPI implementation on PATH; see docs/HOROVOD.md).
#         HOROVOD_WITH_MPI=auto  MPI when mpicxx is on PATH, else Gloo only (what `make` uses).
#         HOROVOD_WITH_MPI=0     (default) Gloo only.
#         HOROVOD_FORCE_REBUILD=1  rebuild even if a working Horovod is installed.
# The build is skipped when the installed Horovod already has what is asked for (MPI
# included when it is wanted): `horovodrun --check-build` is the judge.
set -euo pipefail

PY="${1:-.venv/bin/python}"
HVD_VERSION="0.28.1"
BIN_DIR="$(dirname "$PY")"

case "${HOROVOD_WITH_MPI:-0}" in
    1) command -v mpicxx >/dev/null || {
           echo "error: HOROVOD_WITH_MPI=1 but mpicxx is not on PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)" >&2
           exit 1; }
       WANT_MPI=1 ;;
    auto) if command -v mpicxx >/dev/null; then WANT_MPI=1; else
              WANT_MPI=0
              echo "note: no mpicxx on PATH: building Horovod with Gloo only (no MPI)" >&2
          fi ;;
    0|"") WANT_MPI=0 ;;
    *) echo "error: HOROVOD_WITH_MPI must be 0, 1 or auto, got '${HOROVOD_WITH_MPI}'" >&2; exit 1 ;;
esac
WANTED="TensorFlow + Gloo$([[ $WANT_MPI == 1 ]] && echo ' + MPI')"

# True when this python imports horovod.tensorflow ${HVD_VERSION} built with Gloo and
# `horovodrun --check-build` lists TensorFlow and Gloo (and MPI when it is wanted).
have_working_horovod() {
    "$PY" - "$HVD_VERSION" "$WANT_MPI" <<'PYEOF' >/dev/null 2>&1 || return 1
import sys
import horovod
import horovod.tensorflow as hvd
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert hvd.gloo_built(), "Horovod was built without Gloo"
assert sys.argv[2] != "1" or hvd.mpi_built(), "Horovod was built without MPI"
PYEOF
    local report
    report="$(TF_CPP_MIN_LOG_LEVEL=3 "$BIN_DIR/horovodrun" --check-build 2>/dev/null)" || return 1
    grep -q '\[X\] TensorFlow' <<<"$report" && grep -q '\[X\] Gloo' <<<"$report" || return 1
    [[ $WANT_MPI == 0 ]] || grep -q '\[X\] MPI' <<<"$report"
}

if [[ "${HOROVOD_FORCE_REBUILD:-0}" != "1" ]] && have_working_horovod; then
    echo "horovod ${HVD_VERSION} with ${WANTED} already in $(dirname "$BIN_DIR"); skipping build"
    exit 0
fi

for tool in g++ make; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (Horovod compiles C++ code)" >&2; exit 1; }
done
command -v cmake >/dev/null || echo "note: no cmake on PATH; Horovod's setup.py will pip-install one" >&2
# --no-build-isolation builds with this venv's own setuptools (and wheel).
"$PY" -c 'import setuptools, wheel' 2>/dev/null || "$PY" -m pip install -q setuptools wheel

TF_INCLUDE="$("$PY" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())' 2>/dev/null)"
if [[ ! -d "$TF_INCLUDE/external/highwayhash" ]]; then
    echo "error: TensorFlow headers not found under '$TF_INCLUDE' (is tensorflow installed in $PY?)" >&2
    exit 1
fi

# A shim folder with the one header path Horovod 0.28.1 expects from older TF.
SHIM_DIR="$(mktemp -d -t hvd-xla-shim.XXXXXX)"
trap 'rm -rf "$SHIM_DIR"' EXIT
mkdir -p "$SHIM_DIR/tensorflow/compiler/xla/client"
echo '#include "xla/hlo/builder/xla_builder.h"' > "$SHIM_DIR/tensorflow/compiler/xla/client/xla_builder.h"

export CPLUS_INCLUDE_PATH="$TF_INCLUDE/external/highwayhash:$TF_INCLUDE/external/farmhash_archive/src:$SHIM_DIR${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
export HOROVOD_WITH_TENSORFLOW=1
export HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_PYTORCH=1
export HOROVOD_WITHOUT_MXNET=1
if [[ $WANT_MPI == 1 ]]; then
    export HOROVOD_WITH_MPI=1
    unset HOROVOD_WITHOUT_MPI
else
    export HOROVOD_WITHOUT_MPI=1
    unset HOROVOD_WITH_MPI
fi
export MAKEFLAGS="-j$(nproc)"

echo "building horovod ${HVD_VERSION} (${WANTED}) into $(dirname "$BIN_DIR")"
BUILD_START=$SECONDS
# pip would call an installed-but-broken horovod==X "already satisfied": remove it first.
"$PY" -m pip uninstall -q -y horovod >/dev/null 2>&1 || true
"$PY" -m pip install --no-build-isolation --no-cache-dir --no-binary horovod "horovod==${HVD_VERSION}"

if ! have_working_horovod; then
    echo "error: horovod installed but 'horovodrun --check-build' does not list ${WANTED}" >&2
    "$BIN_DIR/horovodrun" --check-build >&2 || true
    exit 1
fi
echo "horovod ${HVD_VERSION} installed in $((SECONDS - BUILD_START)) s; horovodrun --check-build lists ${WANTED}"
