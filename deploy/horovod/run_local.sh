#!/usr/bin/env bash
# Train on this machine with NP ranks (default 2) through horovodrun + Gloo.
#   deploy/horovod/run_local.sh [train_radam.py options...]
#   NP=4 deploy/horovod/run_local.sh --epochs 10 --lookahead
# Env: NP (ranks), PYTHON (default .venv/bin/python), SCRIPT (default train_radam.py here).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NP="${NP:-2}"
PYTHON="${PYTHON:-.venv/bin/python}"
SCRIPT="${SCRIPT:-$HERE/train_radam.py}"
HOROVODRUN="$(dirname "$PYTHON")/horovodrun"
[[ -x "$HOROVODRUN" ]] || HOROVODRUN="$(command -v horovodrun)" || {
    echo "horovodrun not found: run 'make horovod' first" >&2; exit 1; }
exec "$HOROVODRUN" --gloo -np "$NP" -H "localhost:$NP" "$PYTHON" "$SCRIPT" "$@"
