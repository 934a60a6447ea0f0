"""Keras 3's base-optimizer features on RectifiedAdam and Lookahead(RectifiedAdam), on every
update path: the one-pass kernel (``native``), XLA chunks (``xla``, ``RADAM_DIST_NATIVE=0``),
the per-variable step (``plain``, ``RADAM_DIST_FUSED=0``) and MirroredStrategy over the two
logical CPUs of conftest.py (``mirrored``, steps through ``strategy.run`` in a tf.function,
each replica given half of every gradient, so the cross-replica sum is the single-device
gradient exactly).

Written in the spirit of Keras' own ``optimizer_test.py`` and ``loss_scale_optimizer_test.py``
(constraints, ``overwrite_with_gradient``, static and dynamic loss scaling, EMA, weights,
gradient accumulation, clipping, callable rates, empty gradients), with the expected values
taken from a run without the feature where Keras' tests use hand-computed SGD numbers.
Also: the hyperparameter checks (``radam_math.check_rate``) and the arguments a wrapper
refuses rather than ignores.
"""

import contextlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import radam_dist
from radam_dist import fused, native
from radam_dist import executor

PATHS = ["native", "xla", "plain", "mirrored"]
KINDS = ["radam", "ranger"]

_STRATEGY = []


def _strategy():
    if not _STRATEGY:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
        assert len(devices) == 2, "conftest.py makes two logical CPUs"
        _STRATEGY.append(tf.distribute.MirroredStrategy(devices))
    return _STRATEGY[0]


class Path:
    """One update path: where variables and optimizers are made and how a step runs."""

    def __init__(self, name):
        self.name = name
        self.strategy = _strategy() if name == "mirrored" else None

    def scope(self):
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def variables(self, *values):
        with self.scope():
            return [keras.Variable(np.asarray(v, np.float32)) for v in values]

    def make(self, factory):
        with self.scope():
            return factory()

    def stepper(self, opt, variables, split=True):
        """``step(grads)``: one ``opt.apply`` (None gradients allowed). Under the strategy
        each replica gets half of each gradient (``split``) or all of it."""
        if self.strategy is None:
            def step(grads):
                opt.apply([None if g is None else tf.constant(g, tf.float32) for g in grads],
                          variables)
            return step
        compiled = {}

        def step(grads):
            mask = tuple(g is None for g in grads)
            if mask not in compiled:
                @tf.function
                def run(*present):
                    def replica(*present):
                        parts = iter(present)
                        opt.apply([None if none else (next(parts) / 2 if split else next(parts))
                                   for none in mask], variables)
                    self.strategy.run(replica, args=present)
                compiled[mask] = run
            compiled[mask](*[tf.constant(g, tf.float32) for g in grads if g is not None])
        return step

    def copies(self, variable):
        """Every replica's copy of ``variable`` as numpy (one entry off the strategy)."""
        value = variable.value if isinstance(variable, keras.Variable) else variable
        if self.strategy is None:
            return [np.asarray(value)]
        return [np.asarray(c) for c in self.strategy.experimental_local_results(value)]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv(fused.ENV_SWITCH, "0" if request.param == "plain" else "1")
    monkeypatch.setenv(native.ENV_SWITCH, "0" if request.param == "xla" else "1")
    return Path(request.param)


def _optimizer(kind, sync_period=2, **kwargs):
    kwargs.setdefault("learning_rate", 0.1)
    inner = radam_dist.RectifiedAdam(**kwargs)
    return inner if kind == "radam" else radam_dist.Lookahead(inner, sync_period=sync_period)


def _int(counter) -> int:
    """A step counter's value (``int()`` of a Keras variable fails under a strategy)."""
    value = counter.value if isinstance(counter, keras.Variable) else counter
    return int(tf.convert_to_tensor(value))


def _assert_replicas_agree(path, variable):
    copies = path.copies(variable)
    for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0])
    return copies[0]


GRADS = [np.array([[1.0, -2.0], [0.5, 3.0]], np.float32),
         np.array([4.0, -1.0], np.float32)]
START = [np.array([[0.3, 0.1], [0.05, 0.2]], np.float32), np.array([0.1, 0.2], np.float32)]


def _trajectory(path, make, steps=4, grads=GRADS, split=True):
    variables = path.variables(*START)
    opt = path.make(make)
    step = path.stepper(opt, variables, split=split)
    for _ in range(steps):
        step(grads)
    return opt, variables


def test_the_paths_are_the_paths_they_say(path, monkeypatch):
    """The parametrization reaches the kernel, the XLA chunks, the per-variable step."""
    calls = {"native": 0, "fused": 0}
    real_native, real_fused = native.apply_dense, executor.update_dense

    def spy_native(*a, **k):
        calls["native"] += 1
        return real_native(*a, **k)

    def spy_fused(*a, **k):
        calls["fused"] += 1
        return real_fused(*a, **k)

    monkeypatch.setattr(native, "apply_dense", spy_native)
    monkeypatch.setattr(executor, "update_dense", spy_fused)
    _trajectory(path, lambda: _optimizer("radam"), steps=1)
    if path.name == "plain":
        assert calls == {"native": 0, "fused": 0}
    else:
        assert calls["fused"] > 0
        assert (calls["native"] > 0) == (path.name in ("native", "mirrored")), calls


# -- iterations, empty gradients, callable rates ---------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_iterations_count_steps_and_missing_gradients_are_skipped(path, kind):
    variables = path.variables(*START)
    opt = path.make(lambda: _optimizer(kind, sync_period=6))  # no synchronisation here
    step = path.stepper(opt, variables)
    assert _int(opt.iterations) == 0
    step(GRADS)
    assert _int(opt.iterations) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step([None, GRADS[1]])
    assert any("Gradients do not exist" in str(w.message) for w in caught)
    assert _int(opt.iterations) == 2
    # The variable without a gradient did not move on the second step.
    first = _assert_replicas_agree(path, variables[0])
    reference = path.variables(*START)
    ref_opt = path.make(lambda: _optimizer(kind, sync_period=6))
    path.stepper(ref_opt, reference)(GRADS)
    np.testing.assert_array_equal(first, _assert_replicas_agree(path, reference[0]))
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.apply([None, None], variables)


def test_callable_and_schedule_learning_rates_give_the_float_rates_bits(path):
    _, by_float = _trajectory(path, lambda: radam_dist.RectifiedAdam(0.1), steps=3)
    _, by_callable = _trajectory(path, lambda: radam_dist.RectifiedAdam(lambda: 0.1), steps=3)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=1.0)
    _, by_schedule = _trajectory(path, lambda: radam_dist.RectifiedAdam(schedule), steps=3)
    for a, b, c in zip(by_float, by_callable, by_schedule):
        np.testing.assert_array_equal(path.copies(a)[0], path.copies(b)[0])
        np.testing.assert_array_equal(path.copies(a)[0], path.copies(c)[0])


# -- constraints and overwrite_with_gradient (issue 24 (a), (b)) ------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_constraints_hold_after_every_step_sync_steps_included(path, kind):
    """Keras applies ``variable.constraint`` after the update; Lookahead's pull-back comes
    after that and must not leave a NonNeg kernel negative."""
    # Negative at the start, so are Lookahead's slow weights (the variables' first values).
    variables = path.variables(START[0] - 1.0, START[1])
    variables[0].constraint = keras.constraints.NonNeg()
    opt = path.make(lambda: _optimizer(kind, learning_rate=0.5))
    step = path.stepper(opt, variables)
    positive = [np.abs(g) + 1.0 for g in GRADS]  # every step pushes the kernel down
    for _ in range(4):  # two synchronisations for Lookahead
        step(positive)
        kernel = _assert_replicas_agree(path, variables[0])
        assert kernel.min() >= 0.0, (_int(opt.iterations), kernel)
    assert (kernel == 0.0).any()  # the constraint was active
    bias = _assert_replicas_agree(path, variables[1])
    assert bias.min() < 0.0  # the unconstrained variable went negative


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_with_gradient_variables_hold_their_gradient(path, kind):
    variables = path.variables(*START)
    variables[1].overwrite_with_gradient = True
    opt = path.make(lambda: _optimizer(kind, sync_period=1))
    step = path.stepper(opt, variables, split=False)
    for target in (np.array([5.0, 6.0], np.float32), np.array([-1.0, 2.0], np.float32)):
        step([GRADS[0], target])  # sync_period=1: Lookahead synchronises on every step
        np.testing.assert_array_equal(_assert_replicas_agree(path, variables[1]), target)
    assert not np.array_equal(_assert_replicas_agree(path, variables[0]), START[0])


# -- loss scaling (issue 24 (c)) ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_static_loss_scale_factor_unscales_once(path, kind):
    scaled = [g * 1024.0 for g in GRADS]
    opt, with_factor = _trajectory(path, lambda: _optimizer(kind, loss_scale_factor=1024.0),
                                   steps=3, grads=scaled)
    assert float(opt.scale_loss(1.0)) == 1024.0
    _, without = _trajectory(path, lambda: _optimizer(kind), steps=3)
    for a, b in zip(with_factor, without):
        np.testing.assert_array_equal(_assert_replicas_agree(path, a), path.copies(b)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_loss_scale_optimizer_switches_off_the_inner_factor(path, kind):
    """LossScaleOptimizer sets its inner optimizer's ``loss_scale_factor`` to None; through
    Lookahead that must reach RectifiedAdam, or the gradients are divided twice."""
    scale = 2.0 ** 10

    def make():
        lso = keras.optimizers.LossScaleOptimizer(
            _optimizer(kind, loss_scale_factor=100.0), initial_scale=scale)
        return lso

    variables = path.variables(*START)
    lso = path.make(make)
    with path.scope():
        lso.build(variables)
    assert lso.inner_optimizer.loss_scale_factor is None
    if kind == "ranger":
        assert lso.inner_optimizer.inner_optimizer.loss_scale_factor is None
    step = path.stepper(lso, variables)
    for _ in range(3):
        step([g * scale for g in GRADS])
    _, reference = _trajectory(path, lambda: _optimizer(kind), steps=3)
    for a, b in zip(variables, reference):
        np.testing.assert_array_equal(_assert_replicas_agree(path, a), path.copies(b)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_loss_scale_optimizer_skips_infinite_steps_and_leaves_overwrite_gradients_unscaled(
        path, kind):
    variables = path.variables(*START)
    variables[1].overwrite_with_gradient = True
    lso = path.make(lambda: keras.optimizers.LossScaleOptimizer(
        _optimizer(kind, sync_period=1), initial_scale=400.0))
    with path.scope():
        lso.build(variables)
    step = path.stepper(lso, variables, split=False)
    step([np.full((2, 2), np.inf, np.float32), np.array([1.0, 1.0], np.float32)])
    np.testing.assert_array_equal(_assert_replicas_agree(path, variables[0]), START[0])
    assert _int(lso.iterations) == 0 and float(lso.scale_loss(1.0)) == 200.0
    target = np.array([7.0, -3.0], np.float32)
    step([GRADS[0], target])
    np.testing.assert_array_equal(_assert_replicas_agree(path, variables[1]), target)
    assert _int(lso.iterations) == 1


# -- EMA (issue 24 (d), (f)) ----------------------------------------------------------------
def test_ema_averages_and_overwrites_as_keras_defines_them(path):
    """``use_ema`` with ``ema_overwrite_frequency``: the averages follow Keras' formula over
    the trajectory, and every third step the variables become their averages. Under
    MirroredStrategy in a tf.function this failed (merge_call in a replica-context cond)."""
    momentum, frequency = 0.9, 3
    variables = path.variables(*START)
    opt = path.make(lambda: radam_dist.RectifiedAdam(
        0.1, use_ema=True, ema_momentum=momentum, ema_overwrite_frequency=frequency))
    step = path.stepper(opt, variables)
    reference = [keras.Variable(v) for v in START]  # no strategy, no EMA, same steps
    ref_opt = radam_dist.RectifiedAdam(0.1)
    averages = None
    for i in range(1, 7):
        step(GRADS)
        ref_opt.apply([tf.constant(g) for g in GRADS], reference)
        now = [v.numpy() for v in reference]
        averages = now if averages is None else [
            np.float32(momentum) * a + np.float32(1 - momentum) * n for a, n in zip(averages, now)]
        if i % frequency == 0:
            for ref, average in zip(reference, averages):
                ref.assign(average)
        for var, average, ref, ema in zip(variables, averages, reference,
                                          opt._model_variables_moving_average):
            np.testing.assert_allclose(_assert_replicas_agree(path, ema), average, rtol=1e-5)
            np.testing.assert_allclose(_assert_replicas_agree(path, var), ref.numpy(),
                                       rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_get_and_set_weights_carry_the_ema_averages(path, kind):
    opt, variables = _trajectory(
        path, lambda: _optimizer(kind, use_ema=True, ema_momentum=0.5), steps=3)
    inner = opt if kind == "radam" else opt.inner_optimizer
    weights = opt.get_weights()
    averages = [np.asarray(a) for a in inner._model_variables_moving_average]
    for average in averages:  # the averages are in the list
        assert any(w.shape == average.shape and np.array_equal(w, average) for w in weights)
    other_vars = path.variables(*START)
    other = path.make(lambda: _optimizer(kind, use_ema=True, ema_momentum=0.5))
    with path.scope():
        other.build(other_vars)
    other.set_weights(weights)
    other_inner = other if kind == "radam" else other.inner_optimizer
    for mine, theirs in zip(other_inner._model_variables_moving_average, averages):
        np.testing.assert_array_equal(_assert_replicas_agree(path, mine), theirs)
    with path.scope():
        other.finalize_variable_values(other_vars)
    np.testing.assert_array_equal(_assert_replicas_agree(path, other_vars[0]), averages[0])


def test_lookahead_refuses_the_base_arguments_it_would_ignore():
    for name, value in (("use_ema", True), ("clipnorm", 1.0), ("loss_scale_factor", 8.0),
                        ("gradient_accumulation_steps", 2), ("weight_decay", 0.1),
                        ("ema_overwrite_frequency", 2), ("clipvalue", 1.0),
                        ("global_clipnorm", 1.0), ("ema_momentum", 0.5)):
        with pytest.raises(ValueError, match=f"`{name}`.*inner optimizer"):
            radam_dist.Lookahead(radam_dist.RectifiedAdam(), **{name: value})
    # Defaults, as configs carry them, are fine.
    radam_dist.Lookahead(radam_dist.RectifiedAdam(), clipnorm=None, use_ema=False,
                         ema_momentum=0.99, loss_scale_factor=None, weight_decay=None)


# -- gradient accumulation (issue 24 (e)) ---------------------------------------------------
SINGLE_DEVICE = [p for p in PATHS if p != "mirrored"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", SINGLE_DEVICE, indirect=True)
def test_gradient_accumulation_is_the_step_on_the_mean(path, kind):
    rng = np.random.default_rng(0)
    micro = [[rng.standard_normal(v.shape).astype(np.float32) for v in START] for _ in range(6)]
    accumulated = path.variables(*START)
    opt = path.make(lambda: _optimizer(kind, sync_period=1, weight_decay=0.05,
                                       gradient_accumulation_steps=3))
    step = path.stepper(opt, accumulated)
    for grads in micro:
        step(grads)
    assert _int(opt.iterations) == 2
    mean = path.variables(*START)
    ref = path.make(lambda: _optimizer(kind, sync_period=1, weight_decay=0.05))
    ref_step = path.stepper(ref, mean)
    for k in (0, 3):
        ref_step([(micro[k][i] + micro[k + 1][i] + micro[k + 2][i]) / 3 for i in range(2)])
    for a, b in zip(accumulated, mean):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", SINGLE_DEVICE, indirect=True)
def test_set_weights_restores_a_half_accumulated_step(path, kind):
    def make():
        return _optimizer(kind, gradient_accumulation_steps=2)

    opt, variables = _trajectory(path, make, steps=3)  # one step and one micro-step
    weights = opt.get_weights()
    assert int(weights[0]) == 3  # the micro-step counter, not iterations (1)
    resumed_vars = path.variables(*[v.numpy() for v in variables])
    resumed = path.make(make)
    resumed.build(resumed_vars)
    resumed.set_weights(weights)
    assert _int(resumed.iterations) == 1
    for o, r in ((opt, variables), (resumed, resumed_vars)):
        path.stepper(o, r)(GRADS)  # completes the accumulation: a step
    for a, b in zip(variables, resumed_vars):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(variables[0].numpy(), START[0])


def test_keras_gradient_accumulation_is_refused_under_mirrored_with_what_works():
    """Keras' own gradient_accumulation_steps fails under MirroredStrategy in a tf.function
    (a merge_call in a replica-context cond): refused at once, naming accumulation_steps;
    which then trains there."""
    path = Path("mirrored")
    with pytest.raises(ValueError, match=r"accumulation_steps=2"):
        path.make(lambda: radam_dist.RectifiedAdam(gradient_accumulation_steps=2))
    outside = radam_dist.RectifiedAdam(gradient_accumulation_steps=2)  # made outside the scope
    variables = path.variables(*START)
    with pytest.raises(ValueError, match=r"accumulation_steps=2"):
        path.stepper(outside, variables)(GRADS)
    opt, variables = _trajectory(path, lambda: radam_dist.RectifiedAdam(accumulation_steps=2),
                                 steps=2)
    assert _int(opt.iterations) == 1
    assert not np.array_equal(_assert_replicas_agree(path, variables[0]), START[0])


# -- clipping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_clipping_is_the_step_on_the_clipped_sum(path, clip):
    big = [g * 100.0 for g in GRADS]
    if clip == "clipnorm":
        clipped = [g / np.float32(np.linalg.norm(g)) for g in big]
    elif clip == "clipvalue":
        clipped = [np.clip(g, -1.0, 1.0) for g in big]
    else:
        norm = np.float32(np.sqrt(sum(float(np.sum(g * g)) for g in big)))
        clipped = [g / norm for g in big]
    _, with_clip = _trajectory(path, lambda: _optimizer("ranger", **{clip: 1.0}), steps=3,
                               grads=big)
    _, by_hand = _trajectory(path, lambda: _optimizer("ranger"), steps=3, grads=clipped)
    for a, b in zip(with_clip, by_hand):
        np.testing.assert_allclose(_assert_replicas_agree(path, a), path.copies(b)[0],
                                   rtol=1e-5, atol=1e-6)


# -- LossScaleOptimizer built inside strategy.run (issue 24 (g)) ------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_loss_scale_optimizer_built_lazily_in_a_mirrored_step(kind):
    """Keras' LossScaleOptimizer makes its variables inside the traced step; with Keras'
    all-reduce (here clipnorm) that step then failed on a placeholder (Keras' Adam too).
    Refused at build with what works instead; built beforehand, the same step trains."""
    path = Path("mirrored")

    def run(prebuild, **kwargs):
        variables = path.variables(*START)
        lso = path.make(lambda: keras.optimizers.LossScaleOptimizer(
            _optimizer(kind, **kwargs), initial_scale=4.0))
        if prebuild:
            with path.scope():
                lso.build(variables)
        path.stepper(lso, variables)([g * 4.0 for g in GRADS])
        return _assert_replicas_agree(path, variables[0])

    with pytest.raises(ValueError, match=r"optimizer\.build\(model\.trainable_variables\)"):
        run(False, clipnorm=1.0)
    assert not np.array_equal(run(True, clipnorm=1.0), START[0])
    assert not np.array_equal(run(False), START[0])  # the in-graph sum: lazy builds work


# -- hyperparameters (issue 24, item 3) -----------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"lr": -0.1}, "learning_rate"),
    ({"epsilon": -1e-7}, "epsilon"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"min_lr": -1.0}, "min_lr"),
    ({"decay": float("nan")}, "decay"),
    ({"beta_1": float("nan")}, "beta_1"),
    ({"sma_threshold": float("nan")}, "sma_threshold"),
])
def test_bad_rates_are_refused_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        radam_dist.RectifiedAdam(**kwargs)


def test_schedules_callables_and_tfa_defaults_pass_the_checks():
    schedule = keras.optimizers.schedules.PolynomialDecay(1e-3, 100)
    radam_dist.RectifiedAdam(schedule, weight_decay=schedule)
    radam_dist.RectifiedAdam(lambda: 1e-3, weight_decay=lambda: 0.0)
    assert radam_dist.RectifiedAdam(epsilon=0).epsilon == keras.config.epsilon()  # tfa's rule
    assert radam_dist.RectifiedAdam(epsilon=None).epsilon == keras.config.epsilon()
    radam_dist.RectifiedAdam(learning_rate=0.0, min_lr=0, weight_decay=0, decay=0.0)


def test_setting_a_bad_learning_rate_changes_nothing():
    opt = radam_dist.Lookahead(radam_dist.RectifiedAdam(1e-3))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="learning_rate must be"):
            opt.learning_rate = bad
        with pytest.raises(ValueError, match="learning_rate must be"):
            opt.inner_optimizer.lr = bad
    assert float(opt.learning_rate) == np.float32(1e-3)
    opt.learning_rate = 2e-3
    assert float(opt.inner_optimizer.learning_rate) == np.float32(2e-3)


@pytest.mark.parametrize("kwargs, name", [
    ({"sync_period": float("nan")}, "sync_period"),
    ({"sync_period": 0}, "sync_period"),
    ({"sync_period": 2.5}, "sync_period"),
    ({"slow_step_size": float("nan")}, "slow_step_size"),
    ({"slow_step_size": -0.1}, "slow_step_size"),
])
def test_bad_lookahead_arguments_are_refused_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        radam_dist.Lookahead(radam_dist.RectifiedAdam(), **kwargs)
