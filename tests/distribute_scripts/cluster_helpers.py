"""Shared helpers of tests/test_distribute_*.py: run a script as a real local cluster."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "distribute_scripts"

# float32 tolerance for "same trajectory as one device on the global batch": the only
# difference allowed is the order of the float32 sums (per-replica partial sums, then
# the all-reduce), which RAdam's m / sqrt(v) can amplify by a few ulps per step.
RTOL = 1e-5
ATOL = 1e-6


def quiet_env(extra=None):
    env = dict(os.environ)
    env.update(extra or {})
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TF_CONFIG", None)
    return env


def run(argv, timeout, env=None):
    """Run argv in its own process group; kill the whole group if the test times out."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=quiet_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, out.decode("utf-8", errors="replace")


def launch(workers, ps, script_args, timeout, env=None):
    argv = [sys.executable, "-m", "radam_dist.cli", "launch", "--workers", str(workers)]
    if ps:
        argv += ["--ps", str(ps)]
    return run(argv + ["--", sys.executable] + list(script_args), timeout, env)


def assert_same_trajectories(result_path, expected_cases, rtol=RTOL, atol=ATOL):
    """Every case's distributed trajectory equals its one-device reference, step by step."""
    result = json.loads(pathlib.Path(result_path).read_text())
    assert sorted(result["cases"]) == sorted(expected_cases)
    worst = {}
    for name, case in result["cases"].items():
        assert case["sparse_gradients"], "the Embedding must have produced IndexedSlices"
        reference, distributed = case["reference"], case["distributed"]
        assert len(reference) == len(distributed) > 0
        moved = np.abs(np.array(reference[-1][1]) - np.array(reference[0][1])).max()
        assert moved > 1e-3, "the model must actually train"
        worst[name] = 0.0
        for step, (ref_step, dist_step) in enumerate(zip(reference, distributed)):
            for ref, dist in zip(ref_step, dist_step):
                np.testing.assert_allclose(dist, ref, rtol=rtol, atol=atol,
                                           err_msg=f"{name}, step {step + 1}")
                worst[name] = max(worst[name], float(np.abs(np.subtract(dist, ref)).max()))
    return result, worst


def max_deviation(case):
    """Largest |distributed - reference| over every step and variable of one case."""
    return max(
        float(np.abs(np.subtract(d, r)).max())
        for ref_step, dist_step in zip(case["reference"], case["distributed"])
        for r, d in zip(ref_step, dist_step)
    )


def split_off(result_path, suffix):
    """Remove the cases named ``*-<suffix>`` from the result file; return them."""
    path = pathlib.Path(result_path)
    result = json.loads(path.read_text())
    taken = {n: c for n, c in result["cases"].items() if n.endswith("-" + suffix)}
    result["cases"] = {n: c for n, c in result["cases"].items() if n not in taken}
    path.write_text(json.dumps(result))
    return taken
