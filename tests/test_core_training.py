"""Training paths: model.fit, XLA, mixed precision, MirroredStrategy over two CPU devices."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import radam_dist

OPTIMIZERS = {
    "radam": lambda: radam_dist.RectifiedAdam(0.01, amsgrad=True, weight_decay=1e-3),
    "ranger": lambda: radam_dist.Lookahead(radam_dist.RectifiedAdam(0.01), sync_period=2),
}


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(30, 4)(ids)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8, activation="tanh")(x)
    return keras.Model(ids, keras.layers.Dense(1)(x))


def _dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )


def _data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, 30, size=(n, 6)).astype(np.int32)
    return ids, (ids.sum(axis=1, keepdims=True) / 90.0 - 1).astype(np.float32)


@pytest.mark.parametrize("key", sorted(OPTIMIZERS))
def test_fit_with_jit_compile_matches_graph_mode(key):
    rng = np.random.RandomState(3)
    x, y = rng.randn(64, 5).astype(np.float32), rng.randn(64, 1).astype(np.float32)
    results = []
    for jit in (False, True):
        model = _dense_model()
        model.compile(optimizer=OPTIMIZERS[key](), loss="mse", jit_compile=jit)
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        results.append((model.get_weights(), history.history["loss"]))
    (graph_weights, graph_loss), (xla_weights, xla_loss) = results
    assert xla_loss[-1] < xla_loss[0]
    for a, b in zip(graph_weights, xla_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesting", ["lso-outside", "lso-inside"])
def test_mixed_precision_skipped_steps_leave_lookahead_untouched(nesting):
    var = keras.Variable(np.linspace(-1, 1, 6).astype(np.float32))
    if nesting == "lso-outside":  # what model.compile builds under mixed_float16
        lookahead = radam_dist.Lookahead(radam_dist.RectifiedAdam(0.05), sync_period=2)
        opt = keras.optimizers.LossScaleOptimizer(lookahead)
    else:
        lookahead = radam_dist.Lookahead(
            keras.optimizers.LossScaleOptimizer(radam_dist.RectifiedAdam(0.05)), sync_period=2
        )
        opt = lookahead

    @tf.function
    def step(grad):
        opt.apply_gradients([(grad, var)])

    good = tf.constant(np.linspace(1, 2, 6).astype(np.float32) * 1024)
    for _ in range(3):
        step(good)
    snapshot = {
        "var": var.numpy().copy(),
        "slow": lookahead.get_slot(var, "slow").numpy().copy(),
        "iterations": int(lookahead.iterations.numpy()),
    }
    for bad in (np.inf, np.nan):
        step(tf.constant([1.0, bad, 1.0, 1.0, 1.0, 1.0]))
    assert int(lookahead.iterations.numpy()) == snapshot["iterations"] == 3
    np.testing.assert_array_equal(var.numpy(), snapshot["var"])
    np.testing.assert_array_equal(lookahead.get_slot(var, "slow").numpy(), snapshot["slow"])
    step(good)  # step 4 is a sync step and runs normally afterwards
    assert int(lookahead.iterations.numpy()) == 4
    np.testing.assert_array_equal(lookahead.get_slot(var, "slow").numpy(), var.numpy())
    assert np.all(np.isfinite(var.numpy()))


def test_mixed_float16_policy_fit_trains():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        model.compile(optimizer=OPTIMIZERS["ranger"](), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = _data()
        history = model.fit(x, y, batch_size=16, epochs=4, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@functools.lru_cache(maxsize=None)
def _mirrored_strategy():
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])


def _mirrored():
    """One strategy for the whole file: separate MirroredStrategy objects in one process
    reuse the same collective instance keys, and collectives of different shapes then clash."""
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices (tests/conftest.py sets them up)")
    return _mirrored_strategy()


def _custom_loop(strategy, make_optimizer, x, y, steps, batch, make_model=_model):
    with strategy.scope():
        model = make_model()
        opt = make_optimizer()  # no build() first: slots are created in the first step
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    dist = iter(strategy.experimental_distribute_dataset(dataset))

    @tf.function
    def train_step(inputs):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_sum(tf.square(model(xb) - yb), axis=1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=batch)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica_step, args=inputs)

    for _ in range(steps):
        train_step(next(dist))
    return [w.copy() for w in model.get_weights()], opt


@pytest.mark.parametrize("key", sorted(OPTIMIZERS))
def test_mirrored_strategy_custom_loop_matches_single_device(key):
    x, y = _data()
    single, _ = _custom_loop(tf.distribute.get_strategy(), OPTIMIZERS[key], x, y, 6, 16)
    mirrored, opt = _custom_loop(_mirrored(), OPTIMIZERS[key], x, y, 6, 16)
    assert int(opt.iterations.numpy()) == 6
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("key", sorted(OPTIMIZERS))
def test_mirrored_strategy_fit_matches_single_device(key):
    x, y = _data()
    weights = []
    for strategy in (tf.distribute.get_strategy(), _mirrored()):
        with strategy.scope():
            model = _model()
            model.compile(optimizer=OPTIMIZERS[key](), loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_experimental_aggregate_gradients_false_takes_already_summed_gradients():
    # A dense model: summing an Embedding's IndexedSlices by hand makes them dense, and a
    # dense gradient moves untouched rows (momentum) where a sparse one does not.
    rng = np.random.RandomState(5)
    x, y = rng.randn(64, 5).astype(np.float32), rng.randn(64, 1).astype(np.float32)
    strategy = _mirrored()
    expected, _ = _custom_loop(strategy, OPTIMIZERS["radam"], x, y, 3, 16, _dense_model)
    with strategy.scope():
        model = _dense_model()
        opt = OPTIMIZERS["radam"]()
    dist = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()))

    @tf.function
    def train_step(inputs):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_sum(tf.square(model(xb) - yb), axis=1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=16)
            grads = tape.gradient(loss, model.trainable_variables)
            summed = tf.distribute.get_replica_context().all_reduce("sum", grads)
            opt.apply_gradients(zip(summed, model.trainable_variables),
                                experimental_aggregate_gradients=False)

        strategy.run(replica_step, args=inputs)

    for _ in range(3):
        train_step(next(dist))
    for a, b in zip(expected, model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_tensorboard_records_the_effective_learning_rate(tmp_path):
    model = _dense_model()
    model.compile(optimizer=radam_dist.RectifiedAdam(0.1, total_steps=8, warmup_proportion=0.5),
                  loss="mse")
    x, y = np.ones((8, 5), np.float32), np.ones((8, 1), np.float32)
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[
        radam_dist.EffectiveLearningRate(), keras.callbacks.TensorBoard(str(tmp_path))])
    values = []
    for event_file in sorted((tmp_path / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                if value.tag == "epoch_effective_learning_rate":
                    values.append(float(tf.make_ndarray(value.tensor)))
    # after epoch 1 (4 steps) the next step is 5: warmup over 4 steps is done, then the
    # linear decay to min_lr=0 over 4 steps: 0.1 - 0.1/4 * (5 - 4); after epoch 2: step 9.
    np.testing.assert_allclose(values, [0.075, 0.0], atol=1e-7)
