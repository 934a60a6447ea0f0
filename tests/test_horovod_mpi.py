"""The MPI path: deploy/horovod/run_mpirun.sh (Open MPI's mpirun, 2 ranks) gives the same
weights as the Gloo launch (run_local.sh) of the same seeded train_radam.py.

Needs Open MPI and Horovod built with MPI: `make horovod` installs Open MPI with apt-get
where it runs as root on Debian (deploy/horovod/install_openmpi.sh) and builds with MPI
when mpicxx is there. Elsewhere this file skips and says why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "horovod"
TRAIN_ARGS = ["--seed", "7", "--epochs", "2", "--samples", "256", "--batch-size", "32",
              "--threads", "1", "--lookahead"]


def _why_no_mpi():
    if shutil.which("mpirun") is None:
        return ("Open MPI's mpirun is not on PATH: `make horovod` installs it (apt-get) only "
                "as root on Debian; elsewhere install openmpi-bin libopenmpi-dev and run "
                "HOROVOD_WITH_MPI=1 HOROVOD_FORCE_REBUILD=1 deploy/horovod/build_horovod.sh")
    spec = importlib.util.find_spec("horovod")
    folder = Path(spec.submodule_search_locations[0], "tensorflow") if spec else None
    libs = sorted(folder.glob("mpi_lib*.so")) if folder else []
    if not libs:
        return "Horovod's TensorFlow extension is not installed (make horovod)"
    linked = subprocess.run(["ldd", str(libs[0])], capture_output=True, text=True).stdout
    if "libmpi.so" not in linked:
        return ("Horovod was built without MPI (mpicxx was missing at build time): rebuild with "
                "HOROVOD_WITH_MPI=1 HOROVOD_FORCE_REBUILD=1 deploy/horovod/build_horovod.sh")
    return None


_WHY = _why_no_mpi()
pytestmark = [pytest.mark.horovod, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]


def _launch(script: str, out: Path, extra_env: dict, timeout: float = 200):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHON=sys.executable, **extra_env)
    env.pop("LD_LIBRARY_PATH", None)  # unset, as on most machines: mpirun must not warn
    proc = subprocess.run(
        [str(DEPLOY / script), *TRAIN_ARGS, "--out", str(out),
         "--checkpoint-dir", str(out / "ckpt")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
        start_new_session=True,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return json.loads((out / "summary.json").read_text()), log


def _checkpoint_state(path: Path) -> list:
    import keras

    import radam_dist.horovod  # noqa: F401 (registers DistributedOptimizer for loading)

    model = keras.models.load_model(path)
    return [keras.ops.convert_to_numpy(v) for v in model.weights + model.optimizer.variables]


@pytest.mark.timeout(420)
def test_mpirun_gives_the_weights_of_the_gloo_run(tmp_path):
    gloo, _ = _launch("run_local.sh", tmp_path / "gloo", {"NP": "2"})
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    # MPIRUN_ARGS reaches mpirun: --tag-output prefixes each line with [job,rank];
    # mpi_yield_when_idle stops idle ranks spinning (2 cores shared with TensorFlow).
    env = {"HOSTFILE": str(hosts), "MPIRUN_ARGS": "--tag-output -mca mpi_yield_when_idle 1"}
    mpi, log = _launch("run_mpirun.sh", tmp_path / "mpi", env)
    assert (gloo["controller"], mpi["controller"]) == ("gloo", "mpi")
    # --tag-output reached mpirun (rank 1 ran too: its digest file is checked below; it has
    # nothing to print since the one-pass kernel builds on this CPU and no longer warns)
    assert "[1,0]<stdout>:" in log and "[1,0]<stderr>:" in log, log[-3000:]
    assert "LD_LIBRARY_PATH" not in log and "as root" not in log, log[-3000:]
    assert gloo["steps"] == mpi["steps"] == 8
    digests = {(tmp_path / run / f"digest.rank{r}").read_text()
               for run in ("gloo", "mpi") for r in (0, 1)}
    assert digests == {gloo["weights_digest"]}, digests
    # The whole checkpoint: weights and every optimizer variable (m, v, slow, iterations).
    a = _checkpoint_state(tmp_path / "gloo" / "ckpt" / "epoch-002.keras")
    b = _checkpoint_state(tmp_path / "mpi" / "ckpt" / "epoch-002.keras")
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
