"""radam_dist.horovod under real ``horovodrun --gloo -np 2 -H localhost:2`` jobs.

One two-rank job (module fixture) runs every DistributedOptimizer scenario and, on rank 0,
a single-process reference on the concatenated global batches with the plain optimizer;
the tests compare the saved states. Further jobs resume from its rank-0 checkpoint with
-np 1 and kill a rank mid-training. Needs Horovod built into .venv (`make horovod`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from horovod_helpers import load_npz as _load
from horovod_helpers import run_job

pytestmark = pytest.mark.horovod

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "horovod_scripts" / "hvd_worker.py"
BIN = Path(sys.executable).parent
HOROVODRUN = BIN / "horovodrun"
STEPS = 7  # hvd_worker.STEPS
LOOP_SCENARIOS = ["radam", "lookahead", "sgd", "loss_scale", "sparse_as_dense", "bpps2", "fp16", "bf16"]
COMPRESSED = {"fp16", "bf16"}


def horovodrun(np_: int, *worker_args: str, timeout: float = 240):
    """Run the worker under horovodrun; returns (returncode, output, seconds)."""
    cmd = [
        str(HOROVODRUN), "--gloo", "-np", str(np_), "-H", f"localhost:{np_}",
        sys.executable, str(WORKER), *worker_args,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return run_job(cmd, env, ROOT, timeout)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hvd_main")
    rc, log, _ = horovodrun(2, "main", "--out", str(out))
    assert rc == 0, log[-4000:]
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"ranks differ in {key}")


def _assert_close(got: dict, want: dict, rtol: float, atol: float, skip=()) -> None:
    keys = [k for k in want if k not in skip]
    assert set(keys) <= set(got), set(keys) - set(got)
    for key in keys:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.timeout(120)
def test_check_build_lists_tensorflow_and_gloo():
    out = subprocess.run(
        [str(HOROVODRUN), "--check-build"], capture_output=True, text=True, timeout=100,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    ).stdout
    assert re.search(r"\[X\] TensorFlow", out), out
    assert re.search(r"\[X\] Gloo", out), out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", LOOP_SCENARIOS)
def test_custom_loop_ranks_agree_with_single_process(main_run, name):
    """Ranks start from different weights and (rank 1) garbage optimizer state; after
    broadcast_state and 7 steps they hold identical weights and optimizer state (m, v, vhat,
    slow, iterations), equal to one process training on the concatenated batches."""
    rank0 = _load(main_run / f"{name}.rank0.npz")
    rank1 = _load(main_run / f"{name}.rank1.npz")
    reference = _load(main_run / f"{name}.reference.npz")
    _assert_identical(rank0, rank1)
    assert any(k.startswith("o") for k in reference)  # optimizer state is compared too
    if name in COMPRESSED:  # gradients travel rounded to 16 bits
        _assert_close(rank0, reference, rtol=2e-2, atol=2e-3)
    else:
        _assert_close(rank0, reference, rtol=1e-5, atol=1e-6)
    assert int(rank0["iterations"]) == STEPS  # one step per all-reduce (bpps2: per 2 passes)


@pytest.mark.timeout(300)
def test_fit_with_callbacks(main_run):
    """model.fit with DistributedOptimizer(Lookahead(RectifiedAdam)) and standard_callbacks:
    broadcast at the start, lr scaled by size with warmup, metrics averaged, files from
    rank 0 only."""
    rank0 = _load(main_run / "fit.rank0.npz")
    rank1 = _load(main_run / "fit.rank1.npz")
    reference = _load(main_run / "fit.reference2.npz")
    _assert_identical(rank0, rank1)
    _assert_close(rank0, reference, rtol=1e-5, atol=1e-6, skip=("loss",))
    # lr = base * (1 + (size - 1) * min(1, step / 4)), set before every batch.
    np.testing.assert_allclose(rank0["lr"], 0.01 * (1 + np.minimum(1, np.arange(6) / 4)), rtol=1e-6)
    # Averaged epoch losses equal the global-batch losses of the single process.
    np.testing.assert_allclose(rank0["loss"], reference["loss"], rtol=1e-5)
    csv = (main_run / "fit.log.rank0.csv").read_text().splitlines()
    header = csv[0].split(",")
    logged = [float(row.split(",")[header.index("loss")]) for row in csv[1:]]
    np.testing.assert_allclose(logged, reference["loss"], rtol=1e-5)
    assert not (main_run / "fit.log.rank1.csv").exists(), "rank 1 wrote a log"
    assert (main_run / "fit.epoch2.keras").exists()


@pytest.mark.timeout(120)
def test_broadcast_refuses_mismatched_ranks(main_run):
    for rank in (0, 1):
        result = _load(main_run / f"mismatch.rank{rank}.npz")
        assert "ranks hold different variables" in str(result["message"])
        assert bool(result["unchanged"])


@pytest.mark.timeout(240)
def test_resume_from_rank0_checkpoint_with_other_np(main_run, tmp_path):
    """The -np 2 job's rank-0 checkpoint after epoch 2, resumed with -np 1 (same global
    batch) for epoch 3, equals three epochs in one process."""
    rc, log, _ = horovodrun(
        1, "resume", "--out", str(tmp_path), "--checkpoint", str(main_run / "fit.epoch2.keras")
    )
    assert rc == 0, log[-4000:]
    resumed = _load(tmp_path / "resume.np1.rank0.npz")
    assert int(resumed["resumed_at"]) == 6  # 2 epochs x 3 steps came back with the optimizer
    assert int(resumed["iterations"]) == 9
    reference = _load(main_run / "fit.reference3.npz")
    _assert_close(resumed, reference, rtol=1e-5, atol=1e-6, skip=("loss",))


@pytest.mark.timeout(180)
def test_dead_rank_fails_the_job_fast(tmp_path):
    rc, log, _ = horovodrun(2, "die", "--out", str(tmp_path), timeout=150)
    finished = time.time()
    assert rc != 0, log[-4000:]
    assert "did not fail" not in log
    match = re.search(r"killing myself at step 3 at t=([0-9.]+)", log)
    assert match, log[-4000:]
    after_kill = finished - float(match.group(1))
    print(f"horovodrun exited {after_kill:.1f} s after rank 1 died (rc={rc})")
    assert after_kill < 30, "the job took too long to fail"
