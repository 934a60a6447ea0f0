#!/usr/bin/env bash
# Make Open MPI (mpirun, mpicxx) available for a Horovod build with MPI, where that is
# possible without asking anyone: as root on Debian/Ubuntu, `apt-get install openmpi-bin
# libopenmpi-dev`. Elsewhere it says why not and exits 0: Horovod is then built with Gloo
# only and the MPI tests skip, naming the reason.
#   deploy/horovod/install_openmpi.sh        (make horovod runs it unless HOROVOD_MPI=0)
set -uo pipefail

if command -v mpicxx >/dev/null && command -v mpirun >/dev/null; then
    echo "Open MPI: $(mpirun --version 2>/dev/null | head -1) already on PATH"
    exit 0
fi
why=""
if [[ "$(id -u)" != "0" ]]; then
    why="not root (install openmpi-bin and libopenmpi-dev, or load your MPI module)"
elif ! command -v apt-get >/dev/null; then
    why="no apt-get on this machine (install Open MPI with its package manager)"
fi
if [[ -z "$why" ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -q openmpi-bin libopenmpi-dev; }
    if apt_install >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt_install >/dev/null 2>&1; }; then
        echo "Open MPI: installed $(mpirun --version 2>/dev/null | head -1) with apt-get"
        exit 0
    fi
    why="apt-get install openmpi-bin libopenmpi-dev failed (no package mirror reachable?)"
fi
echo "note: Open MPI not installed: $why; Horovod will be built with Gloo only and the MPI tests will skip" >&2
exit 0
