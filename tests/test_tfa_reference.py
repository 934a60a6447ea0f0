"""Compare our Keras 3 RectifiedAdam / Lookahead with tensorflow-addons 0.23.

``tests/data/tfa_reference.json`` holds trajectories produced by tfa 0.23 itself
(see ``tests/data/make_tfa_reference.py`` for how to regenerate it); every case
is replayed here, gradient for gradient, and each step's variables, the final
slots and the iteration count must agree to float round-off.

``tests/data/tfa_published_expectations.json`` holds the numbers published by
tensorflow/addons' own test-suite; they are checked with the published
tolerances.
"""

import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from radam_dist import Lookahead, RectifiedAdam

DATA = pathlib.Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "tfa_reference.json").read_text())
PUBLISHED = json.loads((DATA / "tfa_published_expectations.json").read_text())

TOLERANCES = {
    "float32": {"rtol": 1e-6, "atol": 1e-7},
    "float64": {"rtol": 1e-12, "atol": 1e-14},
}


# --------------------------------------------------------------------------
# Building optimizers and gradients from the JSON description
# --------------------------------------------------------------------------
def make_schedule(class_name, config):
    config = dict(config)
    # tfa/Keras 2 configs carry "name": None, which Keras 3 schedules reject
    # inside ops.name_scope(); drop it (it has no numerical meaning).
    if config.get("name") is None:
        config.pop("name", None)
    return getattr(keras.optimizers.schedules, class_name)(**config)


class StepCallable:
    """Zero-argument callable whose value is set before each step."""

    def __init__(self, values):
        self.values = [float(v) for v in values]
        self.holder = keras.Variable(self.values[0], dtype="float32", trainable=False,
                                     name="callable_hyperparameter")

    def set_step(self, k):  # k = 0-based step index
        self.holder.assign(self.values[k])

    def __call__(self):
        return self.holder


def build_kwargs(kwargs, callables):
    real = {}
    for key, value in kwargs.items():
        if isinstance(value, dict) and "schedule" in value:
            value = make_schedule(value["schedule"], value["config"])
        elif isinstance(value, dict) and "callable_values" in value:
            value = StepCallable(value["callable_values"])
            callables.append(value)
        real[key] = value
    return real


def build_optimizer(kind, kwargs, callables):
    if kind == "RectifiedAdam":
        return RectifiedAdam(**build_kwargs(kwargs, callables))
    if kind == "Lookahead":
        inner = RectifiedAdam(**build_kwargs(kwargs["inner"], callables))
        return Lookahead(inner, sync_period=kwargs["sync_period"],
                         slow_step_size=kwargs["slow_step_size"])
    raise ValueError(f"unknown optimizer {kind!r}")


def make_grad(grad, dtype):
    if "dense" in grad:
        return tf.constant(np.asarray(grad["dense"], dtype=dtype))
    return tf.IndexedSlices(
        values=tf.constant(np.asarray(grad["values"], dtype=dtype)),
        indices=tf.constant(grad["indices"], tf.int64),
        dense_shape=tf.constant(grad["dense_shape"], tf.int64),
    )


def get_slot(opt, var, slot):
    if isinstance(opt, Lookahead) and slot != "slow":
        return opt.inner_optimizer.get_slot(var, slot)
    return opt.get_slot(var, slot)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


class Mismatches:
    """Collects every value that is not close, to report them all at once."""

    def __init__(self, case, dtype):
        self.case = case
        self.tol = TOLERANCES[dtype]
        self.rows = []

    def check(self, where, actual, expected):
        actual = np.asarray(actual, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        if actual.shape != expected.shape:
            self.rows.append(f"{where}: shape {actual.shape} != {expected.shape}")
            return
        diff = np.abs(actual - expected)
        bad = ~(diff <= self.tol["atol"] + self.tol["rtol"] * np.abs(expected))
        if bad.any():
            rel = diff / np.maximum(np.abs(expected), np.finfo(np.float64).tiny)
            self.rows.append(
                f"{where}: max abs diff {np.nanmax(diff):.3e}, max rel diff "
                f"{np.nanmax(rel):.3e}, {int(bad.sum())}/{bad.size} elements off"
                + (" (NaN present)" if np.isnan(actual).any() else ""))

    def raise_if_any(self):
        if self.rows:
            shown = "\n  ".join(self.rows[:12])
            more = f"\n  ... and {len(self.rows) - 12} more" if len(self.rows) > 12 else ""
            pytest.fail(f"case {self.case!r} ({self.tol}): {len(self.rows)} mismatches; "
                        f"first at {self.rows[0].split(':')[0]}\n  {shown}{more}")


def replay(case):
    dtype = case["dtype"]
    callables = []
    opt = build_optimizer(case["optimizer"], case["kwargs"], callables)
    variables = [keras.Variable(np.asarray(v["initial"], dtype=dtype), dtype=dtype,
                                name=v["name"])
                 for v in case["variables"]]
    names = [v["name"] for v in case["variables"]]
    mism = Mismatches(case["name"], dtype)
    for k, (step, expected) in enumerate(zip(case["steps"], case["trajectory"])):
        for c in callables:
            c.set_step(k)
        grads = [make_grad(g, dtype) for g in step]
        opt.apply_gradients(list(zip(grads, variables)))
        for name, var, exp in zip(names, variables, expected):
            mism.check(f"step {k + 1} {name}", to_numpy(var), exp)
    return opt, variables, names, mism


# --------------------------------------------------------------------------
# Reference trajectories
# --------------------------------------------------------------------------
CASES = REFERENCE["cases"]


def test_reference_file_header():
    assert REFERENCE["generator"] == "tests/data/make_tfa_reference.py"
    assert REFERENCE["tfa_version"] == "0.23.0"
    assert len(CASES) > 0
    assert len({c["name"] for c in CASES}) == len(CASES)


# Cases where tfa is wrong and we deliberately differ (README, "Differences from tfa").
DELIBERATE_DIFFERENCES = {
    # tfa's Lookahead calls the inner optimizer's private apply methods and so silently drops
    # the inner optimizer's clipnorm / clipvalue / global_clipnorm; ours applies them.
    "lookahead_inner_clipnorm_ignored",
}
MATCHED = [c for c in CASES if c["name"] not in DELIBERATE_DIFFERENCES]


@pytest.mark.parametrize("case", MATCHED, ids=[c["name"] for c in MATCHED])
def test_matches_tfa_trajectory(case):
    opt, variables, names, mism = replay(case)
    for slot, expected_per_var in case["final_slots"].items():
        for name, var, exp in zip(names, variables, expected_per_var):
            mism.check(f"final slot {slot}:{name}", to_numpy(get_slot(opt, var, slot)), exp)
    iterations = int(to_numpy(opt.iterations))
    if iterations != case["iterations"]:
        mism.rows.append(f"iterations: {iterations} != {case['iterations']}")
    mism.raise_if_any()


@pytest.mark.parametrize("case", MATCHED, ids=[c["name"] for c in MATCHED])
def test_weights_layout_and_config_keys_match_tfa(case):
    opt, variables, names, _ = replay(case)
    label = {id(opt.iterations): "iter"}
    for slot in case["final_slots"]:
        for name, var in zip(names, variables):
            label[id(get_slot(opt, var, slot))] = f"{slot}:{name}"
    assert [label.get(id(w), "?") for w in opt.weights] == case["weights_layout"]
    assert len(opt.get_weights()) == len(case["weights_layout"])
    missing = set(case["get_config"]) - set(opt.get_config())
    assert not missing, f"tfa config keys we do not write: {missing}"


def test_lookahead_applies_the_inner_clipping_that_tfa_dropped():
    case = next(c for c in CASES if c["name"] == "lookahead_inner_clipnorm_ignored")
    clipnorm = case["kwargs"]["inner"]["clipnorm"]
    _, ours, _, differs_from_tfa = replay(case)
    assert differs_from_tfa.rows, "the inner clipnorm had no effect"
    # Ours equals Lookahead(RectifiedAdam without clipnorm) fed pre-clipped gradients.
    plain = dict(case, kwargs=dict(case["kwargs"], inner={
        k: v for k, v in case["kwargs"]["inner"].items() if k != "clipnorm"}))
    opt = build_optimizer(plain["optimizer"], plain["kwargs"], [])
    dtype = case["dtype"]
    variables = [keras.Variable(np.asarray(v["initial"], dtype=dtype), dtype=dtype)
                 for v in case["variables"]]
    for step in case["steps"]:
        grads = [tf.clip_by_norm(make_grad(g, dtype), clipnorm) for g in step]
        opt.apply_gradients(list(zip(grads, variables)))
    for a, b in zip(ours, variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


# --------------------------------------------------------------------------
# Numbers published by tensorflow/addons' own tests
# --------------------------------------------------------------------------
PUB_RADAM = PUBLISHED["rectified_adam"]
PUB_LOOKAHEAD = PUBLISHED["lookahead"]


@pytest.mark.parametrize("sample", PUB_RADAM["samples"], ids=[s["test"] for s in PUB_RADAM["samples"]])
def test_published_rectified_adam_samples(sample):
    setup = PUB_RADAM[sample["sample"]]
    dtype = setup["dtype"]
    opt = build_optimizer(sample["optimizer"], sample["kwargs"], [])
    variables = [keras.Variable(np.asarray(v, dtype=dtype), dtype=dtype) for v in setup["initial"]]
    grads = [make_grad(g, dtype) for g in setup["grads"]]
    for _ in range(sample["iterations"]):
        opt.apply_gradients(list(zip(grads, variables)))
    for i, (var, exp) in enumerate(zip(variables, sample["expected"])):
        np.testing.assert_allclose(to_numpy(var), exp, atol=sample["atol"], rtol=0,
                                   err_msg=f"{sample['test']} var_{i}")
    assert int(to_numpy(opt.iterations)) == sample["iterations"]


def test_published_rectified_adam_get_config():
    spec = PUB_RADAM["get_config"]
    config = RectifiedAdam(**spec["kwargs"]).get_config()
    # tfa returns the raw Python float; a Keras 3 optimizer may hold the
    # learning rate in a float32 variable, so allow float32 round-off.
    assert config["learning_rate"] == pytest.approx(spec["expected"]["learning_rate"], rel=1e-6)
    assert config["total_steps"] == spec["expected"]["total_steps"]


def test_published_lookahead_get_config():
    spec = PUB_LOOKAHEAD["get_config"]
    opt = Lookahead(RectifiedAdam(), sync_period=spec["kwargs"]["sync_period"],
                    slow_step_size=spec["kwargs"]["slow_step_size"])
    config = opt.get_config()
    assert config["sync_period"] == spec["expected"]["sync_period"]
    assert config["slow_step_size"] == pytest.approx(spec["expected"]["slow_step_size"], rel=1e-6)


def _exact_ratio_sample(kind, seed):
    """Same draws, in the same order, as tfa's lookahead_test run_*_sample."""
    np.random.seed(seed)
    val_0 = np.random.random((2,))
    val_1 = np.random.random((2,))
    if kind == "dense":
        grads = [tf.constant(np.random.standard_normal((2,)), dtype=tf.float32),
                 tf.constant(np.random.standard_normal((2,)), dtype=tf.float32)]
    else:
        grads = [
            tf.IndexedSlices(values=tf.constant([np.random.standard_normal()], tf.float32),
                             indices=tf.constant([0], tf.int64),
                             dense_shape=tf.constant([2], tf.int64)),
            tf.IndexedSlices(values=tf.constant([np.random.standard_normal()], tf.float32),
                             indices=tf.constant([1], tf.int64),
                             dense_shape=tf.constant([2], tf.int64)),
        ]
    return [val_0, val_1], grads


def _run_exact_ratio(kind, opt, iterations, seed):
    vals, grads = _exact_ratio_sample(kind, seed)
    variables = [keras.Variable(v, dtype="float32") for v in vals]
    for _ in range(iterations):
        opt.apply_gradients(list(zip(grads, variables)))
    return vals, [to_numpy(v) for v in variables]


INNER_FACTORIES = {
    # the published test wraps Keras' Adam ("adam"); ours must also hold for RAdam
    "adam": lambda: keras.optimizers.Adam(),
    "radam": lambda: RectifiedAdam(),
}


@pytest.mark.parametrize("inner", sorted(INNER_FACTORIES))
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_published_lookahead_exact_ratio(kind, inner):
    spec = PUB_LOOKAHEAD["exact_ratio"]
    make_inner = INNER_FACTORIES[inner]
    for k in spec["sync_periods"]:
        for alpha in spec["slow_step_sizes"]:
            vals, quick = _run_exact_ratio(kind, make_inner(), k, spec["seed"])
            _, slow = _run_exact_ratio(
                kind, Lookahead(make_inner(), sync_period=k, slow_step_size=alpha),
                k, spec["seed"])
            for i, (val, q, s) in enumerate(zip(vals, quick, slow)):
                expected = val + (q - val) * alpha
                np.testing.assert_allclose(
                    s, expected, rtol=spec["rtol"], atol=spec["atol"],
                    err_msg=f"{kind} inner={inner} sync_period={k} alpha={alpha} var_{i}")
