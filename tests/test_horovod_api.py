"""radam_dist.horovod in one process: argument checks, config round trips, clear errors.

The collective behaviour is tested under horovodrun in test_horovod.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from radam_dist import Lookahead, RectifiedAdam
from radam_dist.horovod import (
    DistributedOptimizer,
    LearningRateScaleWarmup,
    MetricAverage,
    RootRankOnly,
    broadcast_state,
    standard_callbacks,
    unwrap,
)

pytestmark = pytest.mark.horovod


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"compression": "zstd"}, ValueError),
        ({"op": "max"}, ValueError),
        ({"backward_passes_per_step": 0}, ValueError),
        ({"backward_passes_per_step": 1.5}, ValueError),
        ({"clipnorm": 1.0}, TypeError),  # would be silently ignored on the wrapper
    ],
)
def test_bad_arguments_are_refused(kwargs, error):
    with pytest.raises(error):
        DistributedOptimizer(RectifiedAdam(), **kwargs)


def test_wraps_only_keras3_optimizers_once():
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        DistributedOptimizer(object())
    with pytest.raises(ValueError, match="twice"):
        DistributedOptimizer(DistributedOptimizer(RectifiedAdam()))


def test_config_round_trip_keeps_the_wrapped_optimizer():
    import horovod.tensorflow as hvd

    opt = DistributedOptimizer(
        Lookahead(RectifiedAdam(0.02, amsgrad=True), sync_period=4),
        op=hvd.Sum, compression="bf16", backward_passes_per_step=3, sparse_as_dense=True,
    )
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, DistributedOptimizer)
    assert (again.op, again.compression, again.backward_passes_per_step, again.sparse_as_dense) == (
        "sum", "bf16", 3, True,
    )
    inner = unwrap(again)
    assert isinstance(inner, Lookahead) and inner.sync_period == 4
    assert inner.inner_optimizer.amsgrad and np.isclose(float(again.learning_rate), 0.02)


def test_state_is_the_wrapped_optimizers():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    inner = RectifiedAdam()
    opt = DistributedOptimizer(inner, backward_passes_per_step=2)
    opt.build(model.trainable_variables)
    assert opt.iterations is inner.iterations
    assert opt.get_slot_names() == ["m", "v"]
    # inner's variables, then the gradient accumulators (one per variable) and pass counter
    assert len(opt.variables) == len(inner.variables) + len(model.trainable_variables) + 1
    opt.learning_rate = 0.5
    assert np.isclose(float(inner.learning_rate), 0.5)


def test_broadcast_state_needs_hvd_init():
    import horovod.tensorflow as hvd

    if hvd.is_initialized():  # pragma: no cover - only without a launcher
        pytest.skip("horovod already initialized in this process")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(RuntimeError, match="hvd.init"):
        broadcast_state(model, RectifiedAdam())


def test_lr_warmup_formula_and_checks():
    cb = LearningRateScaleWarmup(0.1, warmup_steps=10, scale=4.0)
    assert [round(cb.learning_rate_at(s), 6) for s in (0, 5, 10, 50)] == [0.1, 0.25, 0.4, 0.4]
    assert LearningRateScaleWarmup(0.1, warmup_steps=0, scale=4.0).learning_rate_at(0) == pytest.approx(0.4)
    for bad in ({"base_lr": 0}, {"base_lr": 0.1, "warmup_steps": -1}, {"base_lr": 0.1, "scale": 0}):
        with pytest.raises(ValueError):
            LearningRateScaleWarmup(**bad)


def test_lr_warmup_refuses_a_schedule_and_changes_nothing():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=DistributedOptimizer(RectifiedAdam(schedule)), loss="mse")
    cb = LearningRateScaleWarmup(0.1, warmup_steps=4, scale=2.0)
    cb.set_model(model)
    with pytest.raises(ValueError, match="schedule"):
        cb.on_train_begin()
    assert unwrap(model.optimizer)._learning_rate is schedule


def test_callback_order_and_root_rank_wrapper():
    with pytest.raises(TypeError):
        RootRankOnly("not a callback")
    logger = keras.callbacks.CSVLogger("unused.csv")
    callbacks = standard_callbacks([logger], base_lr=0.1, warmup_steps=2)
    kinds = [type(c).__name__ for c in callbacks]
    assert kinds == ["BroadcastState", "LearningRateScaleWarmup", "MetricAverage", "RootRankOnly"]
    assert callbacks[-1].callback is logger
    assert isinstance(callbacks[2], MetricAverage)


@pytest.fixture
def hvd_one_process():
    """Horovod initialised as a single process (no launcher): size 1, so no communication."""
    import horovod.tensorflow as hvd

    hvd.init()
    try:
        yield hvd
    finally:
        hvd.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_backward_passes_accumulate_the_mean(hvd_one_process, compiled):
    """backward_passes_per_step=2: two passes then one RAdam step on their mean gradient,
    which equals one step on the two micro-batches concatenated."""
    import tensorflow as tf

    def model():
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed=1)),
            ]
        )

    accumulating, plain = model(), model()
    opt_a = DistributedOptimizer(RectifiedAdam(0.05, amsgrad=True), backward_passes_per_step=2)
    opt_b = RectifiedAdam(0.05, amsgrad=True)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(6, 5, 4)).astype("float32")
    ys = rng.normal(size=(6, 5, 3)).astype("float32")

    def make_step(m, opt):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(m(x) - y))
            grads = tape.gradient(loss, m.trainable_variables)
            opt.apply_gradients(zip(grads, m.trainable_variables))

        return tf.function(step) if compiled else step

    step_a, step_b = make_step(accumulating, opt_a), make_step(plain, opt_b)
    for k in range(3):
        step_a(xs[2 * k], ys[2 * k])
        assert int(opt_a.iterations.numpy()) == k  # the first pass of a pair does not step
        step_a(xs[2 * k + 1], ys[2 * k + 1])
        step_b(np.concatenate(xs[2 * k:2 * k + 2]), np.concatenate(ys[2 * k:2 * k + 2]))
    assert int(opt_a.iterations.numpy()) == 3
    for a, b in zip(accumulating.weights, plain.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    for wa, wb in zip(opt_a.get_weights(), opt_b.get_weights()):  # iterations, m, v, vhat
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-7)
