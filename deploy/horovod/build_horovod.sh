#!/usr/bin/env bash
# Build Horovod 0.28.1 from source (no wheel exists for TF 2.21 / Python 3.11)
# with TensorFlow + Gloo into the given virtualenv python (default .venv/bin/python).
#
# Why the extra steps: Horovod 0.28.1 predates TF 2.21. TF's wheel ships the headers
# Horovod needs, but two of them live under external/ folders that TF's
# compile flags do not list, and Horovod's sources still include the old XLA
# path tensorflow/compiler/xla/client/xla_builder.h (moved to xla/hlo/builder/).
#
# Usage:  deploy/horovod/build_horovod.sh [PYTHON]
# Env:    HOROVOD_WITH_MPI=1   build the MPI controller too (needs mpicxx / an MPI
#                              implementation on PATH; see docs/HOROVOD.md).
#         HOROVOD_FORCE_REBUILD=1  rebuild even if a working Horovod is installed.
set -euo pipefail

PY="${1:-.venv/bin/python}"
HVD_VERSION="0.28.1"
BIN_DIR="$(dirname "$PY")"

# True when this python imports horovod.tensorflow ${HVD_VERSION} built with Gloo and
# `horovodrun --check-build` lists TensorFlow and Gloo.
have_working_horovod() {
    "$PY" - "$HVD_VERSION" <<'PYEOF' >/dev/null 2>&1 || return 1
import sys
import horovod
import horovod.tensorflow as hvd
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert hvd.gloo_built(), "Horovod was built without Gloo"
PYEOF
    local report
    report="$(TF_CPP_MIN_LOG_LEVEL=3 "$BIN_DIR/horovodrun" --check-build 2>/dev/null)" || return 1
    grep -q '\[X\] TensorFlow' <<<"$report" && grep -q '\[X\] Gloo' <<<"$report"
}

if [[ "${HOROVOD_FORCE_REBUILD:-0}" != "1" ]] && have_working_horovod; then
    echo "horovod ${HVD_VERSION} with TensorFlow+Gloo already in $(dirname "$BIN_DIR"); skipping build"
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
if [[ "${HOROVOD_WITH_MPI:-0}" == "1" ]]; then
    unset HOROVOD_WITHOUT_MPI
else
    export HOROVOD_WITHOUT_MPI=1
    unset HOROVOD_WITH_MPI
fi
export MAKEFLAGS="-j$(nproc)"

echo "building horovod ${HVD_VERSION} (TensorFlow + Gloo$([[ "${HOROVOD_WITH_MPI:-0}" == "1" ]] && echo ' + MPI')) into $(dirname "$BIN_DIR")"
# pip would call an installed-but-broken horovod==X "already satisfied": remove it first.
"$PY" -m pip uninstall -q -y horovod >/dev/null 2>&1 || true
"$PY" -m pip install --no-build-isolation --no-cache-dir --no-binary horovod "horovod==${HVD_VERSION}"

if ! have_working_horovod; then
    echo "error: horovod installed but 'horovodrun --check-build' does not list TensorFlow and Gloo" >&2
    "$BIN_DIR/horovodrun" --check-build >&2 || true
    exit 1
fi
echo "horovod ${HVD_VERSION} installed; horovodrun --check-build lists TensorFlow and Gloo"
