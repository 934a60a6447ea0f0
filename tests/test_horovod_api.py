"""radam_dist.horovod in one process: argument checks, config round trips, clear errors.

The collective behaviour is tested under horovodrun in test_horovod.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from radam_dist import Lookahead, RectifiedAdam
from radam_dist.horovod import (
    DistributedOptimizer,
    LearningRateScaleWarmup,
    MetricAverage,
    RootRankOnly,
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


@pytest.mark.timeout(120)
def test_broadcast_state_needs_hvd_init():
    """In a fresh process (this one may have called hvd.init() already, once for good)."""
    code = textwrap.dedent(
        """
        import keras
        from radam_dist import RectifiedAdam
        from radam_dist.horovod import broadcast_state
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        try:
            broadcast_state(model, RectifiedAdam())
        except RuntimeError as exc:
            print("refused:", exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused:" in out.stdout and "hvd.init" in out.stdout, out.stdout + out.stderr[-3000:]


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


@pytest.fixture(scope="session")
def hvd_one_process():
    """Horovod initialised as a single process (no launcher): size 1, so no communication.

    Once per pytest process and never shut down here: on a Horovod built with MPI,
    ``hvd.shutdown()`` finalizes MPI, which cannot start again in the same process (the next
    ``hvd.init()`` aborts the whole interpreter). Horovod shuts down at exit by itself.
    """
    return hvd_initialized_once()


def hvd_initialized_once():
    import horovod.tensorflow as hvd

    if not hvd.is_initialized():
        hvd.init()
    assert hvd.size() == 1, "the in-process Horovod tests expect a single process"
    return hvd


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


# -- radam_dist.horovod.elastic in one process (the elastic jobs: test_horovod_elastic.py) ---
def _elastic_case(kind: str):
    model = keras.Sequential(
        [keras.Input((4,)),
         keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed=3))]
    )
    if kind == "radam":
        opt = RectifiedAdam(0.05, amsgrad=True, weight_decay=1e-3)
    elif kind == "lookahead":
        opt = Lookahead(RectifiedAdam(0.05), sync_period=2)
    elif kind == "distributed_bpps3":
        opt = DistributedOptimizer(Lookahead(RectifiedAdam(0.05)), backward_passes_per_step=3)
    else:
        opt = keras.optimizers.Adam(0.05)
    return model, opt


def _train(model, opt, steps: int, seed: int) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.normal(size=(5, 4)).astype("float32")
        y = rng.normal(size=(5, 3)).astype("float32")
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["radam", "lookahead", "distributed_bpps3", "keras_adam"])
def test_elastic_state_commit_restore_is_bit_identical(hvd_one_process, kind):
    """Commit after 4 steps, train 5 more (every variable moves), restore: every model and
    optimizer variable (iterations, m, v, vhat, slow, accumulators) comes back bit for bit,
    and so do the Python values; sync (size 1) keeps them."""
    from radam_dist.horovod import elastic

    model, opt = _elastic_case(kind)
    _train(model, opt, 4, seed=0)
    state = elastic.KerasState(model, opt, epoch=2, step=4)
    assert len(state.variables) == len(model.variables) + len(opt.variables)
    state.commit()
    committed = [v.numpy().copy() for v in state.variables]
    _train(model, opt, 5, seed=1)
    state.epoch, state.step = 3, 9
    moved = [not np.array_equal(a, v.numpy()) for a, v in zip(committed, state.variables)]
    assert sum(moved) >= len(model.trainable_variables) + 2, moved  # weights, iterations, slots
    state.restore()
    for a, v in zip(committed, state.variables):
        assert a.dtype == v.numpy().dtype and a.tobytes() == v.numpy().tobytes(), v.name
    assert (state.epoch, state.step, state.restores) == (2, 4, 1)
    state.sync()
    for a, v in zip(committed, state.variables):
        assert a.tobytes() == v.numpy().tobytes(), v.name


def test_elastic_state_and_callback_refuse_what_they_cannot_keep(hvd_one_process):
    from radam_dist.horovod import elastic

    model, opt = _elastic_case("radam")
    with pytest.raises(ValueError, match="optimizer"):
        elastic.KerasState(model)  # not compiled, no optimizer given
    with pytest.raises(ValueError, match="taken"):
        elastic.KerasState(model, opt, restores=1)
    with pytest.raises(ValueError, match="epoch=0"):
        elastic.CommitState(elastic.KerasState(model, opt, step=0))
    with pytest.raises(ValueError, match="positive"):
        elastic.CommitState(elastic.KerasState(model, opt, epoch=0), epochs_per_commit=0)


def test_elastic_recognises_every_horovod_collective_failure(hvd_one_process):
    """Grouped ops too (hvd.elastic.run knows only HorovodAllreduce/Allgather/Broadcast and
    swallows the rest); other errors pass through unchanged."""
    import tensorflow as tf

    from radam_dist.horovod import elastic

    for op in ("HorovodGroupedAllreduce", "HorovodGroupedAllgather", "HorovodAllreduce",
               "HorovodBroadcast", "HorovodAlltoall", "HorovodReducescatter"):
        error = tf.errors.UnknownError(None, None, f"Read error [[{{{{node {op}_grads_0}}}}]]")
        assert elastic.is_collective_failure(error), op
        with pytest.raises(elastic.HorovodInternalError):
            with elastic._collective_failures_as_internal_errors():
                raise error
    plain = tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [2] vs. [3]")
    assert not elastic.is_collective_failure(plain)
    assert not elastic.is_collective_failure(ValueError("HorovodAllreduce"))
    with pytest.raises(tf.errors.InvalidArgumentError):
        with elastic._collective_failures_as_internal_errors():
            raise plain


def test_elastic_run_lets_other_errors_through(hvd_one_process):
    from radam_dist.horovod import elastic

    model, opt = _elastic_case("radam")
    state = elastic.KerasState(model, opt, step=0)

    @elastic.run
    def train(state):
        state.step += 1
        raise ZeroDivisionError("a bug in the training function")

    with pytest.raises(ZeroDivisionError):
        train(state)
    assert state.restores == 0


def test_elastic_function_retraces_after_a_reset(hvd_one_process, monkeypatch):
    """A new Horovod generation (after shutdown/init) or a new size means a new trace."""
    import tensorflow as tf

    from radam_dist.horovod import elastic

    traces = []

    @elastic.function
    def f(x):
        traces.append(1)
        return x + 1

    f(tf.constant(1.0)), f(tf.constant(2.0))
    assert len(traces) == 1
    monkeypatch.setattr(elastic, "_generation", elastic.generation() + 1)
    assert float(f(tf.constant(3.0))) == 4.0 and len(traces) == 2
    f(tf.constant(4.0))
    assert len(traces) == 2
