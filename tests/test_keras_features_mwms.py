"""Keras 3's base-optimizer features on RectifiedAdam and Lookahead(RectifiedAdam) under
MultiWorkerMirroredStrategy with two real worker processes (``radam-dist launch``,
TF_CONFIG): what tests/test_keras_features.py checks on one device and under
MirroredStrategy x2, here across processes.

distribute_scripts/keras_features_mwms.py runs every case once, in one pair of workers
(every replica given half of each gradient, so the all-reduced sum is the full gradient
exactly); this file runs the same cases without a strategy (full gradients) and asserts, on
both workers, that every variable after every step equals the single-device value:

* a NonNeg constraint holds after every step, Lookahead's synchronisations included;
* an ``overwrite_with_gradient`` variable holds its gradient. Keras (TF backend) assigns each
  replica's copy that replica's own gradient, with no all-reduce (``v.assign(g)`` in replica
  context on a variable of aggregation "none"): given the whole target on every replica the
  variable is the target, given half on each it is the half; MirroredStrategy does the same
  (test_keras_features.py gives every replica the whole target);
* LossScaleOptimizer around an optimizer with ``loss_scale_factor`` set: the factor is
  switched off through Lookahead, an infinite step is skipped on both workers, and the
  scaled gradients are unscaled exactly once (the steps of the plain optimizer on the
  unscaled gradients);
* ``use_ema`` with ``ema_overwrite_frequency=2``: variables, averages and ``get_weights()``;
* ``clipnorm`` and ``global_clipnorm`` clip the global gradient (after the cross-replica
  sum), not each replica's part.
"""

import functools
import json
import pathlib
import sys

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402
import keras_features_mwms as kf  # noqa: E402

pytestmark = pytest.mark.timeout(300)

SCRIPT = str(ch.SCRIPTS / "keras_features_mwms.py")
RTOL, ATOL = 1e-6, 1e-7
WORKERS = (0, 1)


@pytest.fixture(scope="module")
def mwms(tmp_path_factory):
    """Both workers' results: {worker index: result}."""
    out = tmp_path_factory.mktemp("keras_features_mwms") / "result.json"
    code, log = ch.launch(2, 0, [SCRIPT, "--out", str(out)], 240)
    assert code == 0, log[-6000:]
    results = {0: json.loads(out.read_text()),
               1: json.loads(pathlib.Path(f"{out}.1").read_text())}
    for result in results.values():
        assert result["num_replicas"] == 2
    return results


@functools.lru_cache(maxsize=None)
def _reference(name, kind):
    """The case without a strategy: full gradients, one device."""
    return kf.run_case(name, kind, None)


def _case(mwms, name, kind, worker):
    key = f"{name}-{kind}"
    result = mwms[worker]
    if key in result["errors"]:
        pytest.fail(f"worker {worker}, {key} under MWMS: {result['errors'][key]}")
    assert key in result["cases"], (
        f"worker {worker} never ran {key}: an earlier case failed: {result['errors']}")
    return result["cases"][key]


def _close(got, want, what):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=RTOL, atol=ATOL, err_msg=what)


def _assert_same_steps(got_steps, want_steps, what, variables=None):
    assert len(got_steps) == len(want_steps) > 0
    for step, (got, want) in enumerate(zip(got_steps, want_steps), 1):
        for i in variables if variables is not None else range(len(want)):
            _close(got[i], want[i], f"{what}, step {step}, variable {i}")


def _assert_workers_agree(mwms, name, kind):
    first = _case(mwms, name, kind, 0)
    for worker in WORKERS[1:]:
        for a, b in zip(first["steps"], _case(mwms, name, kind, worker)["steps"]):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y, err_msg=f"{name}-{kind}: worker {worker}")


# -- constraints --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", kf.KINDS)
def test_constraint_holds_after_every_step_and_matches_one_device(mwms, kind):
    want = _reference("constraint", kind)
    for worker in WORKERS:
        case = _case(mwms, "constraint", kind, worker)
        assert case["iterations"] == 4
        for step, (kernel, _) in enumerate(case["steps"], 1):
            assert np.min(kernel) >= 0.0, (worker, step, kernel)  # sync steps 2, 4 included
        _assert_same_steps(case["steps"], want["steps"], f"constraint-{kind} worker {worker}")
        kernel, bias = (np.asarray(v) for v in case["steps"][-1])
        assert (kernel[:, 0] == 0.0).all()  # the constraint was active
        assert (kernel[:, 1] > kf.CONSTRAINT_START[0][:, 1]).all()  # the rest trained
        assert bias.min() < 0.0  # the unconstrained variable went negative
    _assert_workers_agree(mwms, "constraint", kind)


# -- overwrite_with_gradient --------------------------------------------------------------------
@pytest.mark.parametrize("kind", kf.KINDS)
def test_overwrite_with_gradient_variable_holds_each_replicas_gradient(mwms, kind):
    want = _reference("overwrite", kind)
    for worker in WORKERS:
        case = _case(mwms, "overwrite", kind, worker)
        n = case["num_replicas"]
        assert n == 2 and case["iterations"] == 3
        # Steps 1-2: every replica gave the whole target; the variable is the target, as
        # on one device.
        for step in (0, 1):
            np.testing.assert_array_equal(case["steps"][step][1], kf.OVERWRITE_TARGETS[step])
            np.testing.assert_array_equal(want["steps"][step][1], kf.OVERWRITE_TARGETS[step])
        # Step 3: each replica gave its half; Keras assigns each copy its own gradient (no
        # all-reduce), so each worker holds the half, not the sum.
        np.testing.assert_array_equal(case["steps"][2][1], kf.OVERWRITE_TARGETS[2] / n)
        # The kernel beside it trained as on one device (Lookahead synced it every step).
        _assert_same_steps(case["steps"], want["steps"], f"overwrite-{kind} worker {worker}",
                           variables=[0])
        assert not np.array_equal(case["steps"][-1][0], kf.START[0])
    _assert_workers_agree(mwms, "overwrite", kind)


# -- LossScaleOptimizer -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", kf.KINDS)
def test_loss_scale_optimizer_unscales_once_and_skips_infinite_steps(mwms, kind):
    want = _reference("lso", kind)  # the plain optimizer on the unscaled gradients
    for worker in WORKERS:
        case = _case(mwms, "lso", kind, worker)
        assert case["inner_factors"] == [None, None]  # through Lookahead to RectifiedAdam
        skipped = case["skipped"]
        assert skipped["iterations"] == 0 and skipped["scale"] == kf.LOSS_SCALE / 2
        for got, start in zip(skipped["variables"], kf.START):
            np.testing.assert_array_equal(got, start)
        assert case["iterations"] == 3 and case["scale"] == kf.LOSS_SCALE / 2
        _assert_same_steps(case["steps"], want["steps"], f"lso-{kind} worker {worker}")
    _assert_workers_agree(mwms, "lso", kind)


# -- EMA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", kf.KINDS)
def test_ema_variables_averages_and_weights_match_one_device(mwms, kind):
    want = _reference("ema", kind)
    for worker in WORKERS:
        case = _case(mwms, "ema", kind, worker)
        what = f"ema-{kind} worker {worker}"
        assert case["iterations"] == 4
        _assert_same_steps(case["steps"], want["steps"], what)
        _assert_same_steps(case["averages"], want["averages"], what + " averages")
        assert len(case["weights"]) == len(want["weights"])
        for i, (got, ref) in enumerate(zip(case["weights"], want["weights"])):
            _close(got, ref, f"{what}, get_weights()[{i}]")
        for average in case["averages"][-1]:  # get_weights() carries the averages
            assert any(np.shape(w) == np.shape(average) and np.array_equal(w, average)
                       for w in case["weights"]), what
        if kind == "radam":  # every second step the variables became their averages
            for step in (1, 3):
                for var, average in zip(case["steps"][step], case["averages"][step]):
                    np.testing.assert_array_equal(var, average)
            # (after step 1 the averages are the variables: Keras starts them there)
            assert not np.array_equal(case["steps"][2][0], case["averages"][2][0])
    _assert_workers_agree(mwms, "ema", kind)


# -- clipping -----------------------------------------------------------------------------------
def _clipped_per_replica(kind, clip, n=2):
    """The trajectory if each of ``n`` replicas clipped its own part and the parts were then
    summed (Keras 3's order under a strategy): what the MWMS run must not equal."""
    run = kf.Runner(None)
    variables = run.variables(*kf.START)
    step = run.stepper(run.make(lambda: kf.optimizer(kind)), variables)
    steps = []
    for size in kf.CLIP_SIZES:
        parts = [tf.constant(g * np.float32(size) / n) for g in kf.GRADS]
        if clip == "clipnorm":
            parts = [tf.clip_by_norm(p, 1.0) for p in parts]
        else:
            parts = tf.clip_by_global_norm(parts, 1.0)[0]
        step([p.numpy() * n for p in parts])
        steps.append(run.snapshot(variables))
    return steps


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
@pytest.mark.parametrize("kind", kf.KINDS)
def test_clipping_clips_the_cross_replica_sum(mwms, kind, clip):
    want = _reference(clip, kind)
    wrong = _clipped_per_replica(kind, clip)
    assert not all(np.allclose(w, r, rtol=RTOL, atol=ATOL)
                   for ws, rs in zip(wrong, want["steps"]) for w, r in zip(ws, rs)), (
        "the cases must tell clipping the sum from clipping each replica's part")
    for worker in WORKERS:
        case = _case(mwms, clip, kind, worker)
        assert case["iterations"] == len(kf.CLIP_SIZES)
        _assert_same_steps(case["steps"], want["steps"], f"{clip}-{kind} worker {worker}")
    _assert_workers_agree(mwms, clip, kind)
