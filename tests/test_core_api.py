"""The classic (tf.keras / tfa) optimizer API on Keras 3, and tfa's documented defects fixed."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import radam_dist
from radam_dist import radam_math


def _vars(dtype="float32"):
    return [
        keras.Variable(np.array([1.0, 2.0, 3.0]), dtype=dtype, name="a"),
        keras.Variable(np.arange(6.0).reshape(2, 3) / 10, dtype=dtype, name="b"),
    ]


def _grads(step, dtype=tf.float32):
    rng = np.random.RandomState(step)
    return [tf.constant(rng.randn(3), dtype), tf.constant(rng.randn(2, 3), dtype)]


def _run(opt, variables, steps, start=0):
    for step in range(start, start + steps):
        opt.apply_gradients(zip(_grads(step, variables[0].dtype), variables))
    return [v.numpy().copy() for v in variables]


def test_slot_names_weights_layout_and_get_slot():
    opt = radam_dist.RectifiedAdam(amsgrad=True)
    variables = _vars()
    _run(opt, variables, 2)
    assert opt.get_slot_names() == ["m", "v", "vhat"]
    weights = opt.get_weights()
    # tfa's layout: iterations, then m for every variable, v for every variable, vhat ...
    assert len(weights) == 1 + 3 * 2
    assert int(weights[0]) == 2
    np.testing.assert_array_equal(weights[1], opt.get_slot(variables[0], "m").numpy())
    np.testing.assert_array_equal(weights[2], opt.get_slot(variables[1], "m").numpy())
    np.testing.assert_array_equal(weights[4], opt.get_slot(variables[1], "v").numpy())
    np.testing.assert_array_equal(weights[6], opt.get_slot(variables[1], "vhat").numpy())
    assert opt.weights[0] is opt.iterations
    with pytest.raises(KeyError, match="no slot named 'slow'"):
        opt.get_slot(variables[0], "slow")
    with pytest.raises(KeyError, match="not among the variables"):
        opt.get_slot(keras.Variable([1.0]), "m")


def test_set_weights_restores_a_trajectory_and_rejects_bad_lists_without_changes():
    a = radam_dist.RectifiedAdam(learning_rate=0.01)
    va = _vars()
    _run(a, va, 4)
    saved_weights, saved_vars = a.get_weights(), [v.numpy() for v in va]
    expected = _run(a, va, 3, start=4)

    b = radam_dist.RectifiedAdam(learning_rate=0.01)
    vb = _vars()
    b.build(vb)
    for v, value in zip(vb, saved_vars):
        v.assign(value)
    before = b.get_weights()
    bad = list(saved_weights)
    bad[-1] = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="shape"):
        b.set_weights(bad)
    with pytest.raises(ValueError, match="expected 5 arrays"):
        b.set_weights(saved_weights[:-1])
    for got, want in zip(b.get_weights(), before):  # nothing was assigned
        np.testing.assert_array_equal(got, want)
    b.set_weights(saved_weights)
    for got, want in zip(_run(b, vb, 3, start=4), expected):
        np.testing.assert_array_equal(got, want)


def test_add_slot_with_initial_value():
    opt = radam_dist.RectifiedAdam()
    variables = _vars()
    opt.build(variables)
    slot = opt.add_slot(variables[1], "custom", initializer=variables[1])
    np.testing.assert_array_equal(slot.numpy(), variables[1].numpy())
    assert opt.add_slot(variables[1], "custom") is slot
    assert opt.get_slot_names() == ["m", "v", "custom"]


def test_minimize_with_tape_and_with_callable_match_apply_gradients():
    def loss_fn(variables):
        return tf.reduce_sum(variables[0] ** 2) + tf.reduce_sum(tf.sin(variables[1]))

    ref_vars = _vars()
    ref = radam_dist.RectifiedAdam(0.05)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = loss_fn(ref_vars)
        ref.apply_gradients(zip(tape.gradient(loss, ref_vars), ref_vars))

    tape_vars = _vars()
    opt = radam_dist.RectifiedAdam(0.05)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = loss_fn(tape_vars)
        opt.minimize(loss, tape_vars, tape=tape)

    call_vars = _vars()
    opt2 = radam_dist.RectifiedAdam(0.05)
    for _ in range(3):
        opt2.minimize(lambda: loss_fn(call_vars), lambda: call_vars, name="step")

    for r, t, c in zip(ref_vars, tape_vars, call_vars):
        np.testing.assert_array_equal(r.numpy(), t.numpy())
        np.testing.assert_array_equal(r.numpy(), c.numpy())
    with pytest.raises(ValueError, match="tape"):
        opt.minimize(tf.constant(1.0), tape_vars)


def test_raw_tf_variables_work_like_keras_variables():
    keras_vars = _vars()
    tf_vars = [tf.Variable(v.numpy()) for v in _vars()]
    for got, want in zip(
        _run(radam_dist.RectifiedAdam(0.01), tf_vars, 7),
        _run(radam_dist.RectifiedAdam(0.01), keras_vars, 7),
    ):
        np.testing.assert_array_equal(got, want)


def test_eager_and_tf_function_agree_bitwise():
    eager_vars, graph_vars = _vars(), _vars()
    eager = radam_dist.Lookahead(radam_dist.RectifiedAdam(0.02, amsgrad=True), sync_period=3)
    graph = radam_dist.Lookahead(radam_dist.RectifiedAdam(0.02, amsgrad=True), sync_period=3)

    @tf.function
    def step(grads):
        graph.apply_gradients(zip(grads, graph_vars))

    for i in range(10):
        eager.apply_gradients(zip(_grads(i), eager_vars))
        step(_grads(i))
    for e, g in zip(eager_vars, graph_vars):
        np.testing.assert_array_equal(e.numpy(), g.numpy())
    assert int(graph.iterations.numpy()) == 10


def test_unknown_variable_and_wrong_shape_fail_cleanly():
    opt = radam_dist.RectifiedAdam()
    variables = _vars()
    _run(opt, variables, 1)
    before = [v.numpy().copy() for v in variables] + opt.get_weights()
    with pytest.raises(ValueError, match="Unknown variable"):
        opt.apply_gradients([(tf.ones(2), keras.Variable([1.0, 2.0]))])
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        opt.apply_gradients(zip([tf.ones(4), tf.ones((2, 3))], variables))
    after = [v.numpy() for v in variables] + opt.get_weights()
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.1}, "beta_2"),
        ({"total_steps": -5}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"warmup_proportion": 1.5}, "warmup_proportion"),
        ({"decay": -1.0}, "decay"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"clipnorm": 1.0, "clipvalue": 1.0}, "Only one of"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        radam_dist.RectifiedAdam(**kwargs)


def test_lookahead_rejects_non_keras3_optimizers_and_bad_arguments():
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        radam_dist.Lookahead(object())
    with pytest.raises(ValueError, match="sync_period"):
        radam_dist.Lookahead(radam_dist.RectifiedAdam(), sync_period=0)
    with pytest.raises(ValueError, match="slow_step_size"):
        radam_dist.Lookahead(radam_dist.RectifiedAdam(), slow_step_size=2.0)


# -- tfa's defects, fixed -------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, 2.5, 3.0, 3.5])
def test_sma_threshold_below_four_never_gives_nan(threshold):
    variables = _vars()
    opt = radam_dist.RectifiedAdam(learning_rate=0.01, sma_threshold=threshold)
    for step in range(1, 12):
        _run(opt, variables, 1, start=step)
        sma_t, r_t, rectified = radam_math.rectification(
            tf.constant(float(step)), tf.constant(0.999), tf.constant(threshold)
        )
        assert np.isfinite(r_t.numpy())
        for v in variables:
            assert np.all(np.isfinite(v.numpy())), (threshold, step)
        if 2.0 < sma_t.numpy() < 4.0:  # where tfa takes sqrt of a negative number
            assert not rectified.numpy()


def _constant_gradient_run(dtype, steps=12, iterations=0, grad=1e-3):
    var = keras.Variable(np.ones(4), dtype=dtype)
    opt = radam_dist.RectifiedAdam(learning_rate=0.1)
    opt.build([var])
    opt.iterations.assign(iterations)
    for _ in range(steps):
        opt.apply_gradients([(tf.constant(np.full(4, grad), dtype), var)])
    return var.numpy().astype(np.float64)


def test_bfloat16_variables_rectify():
    # tfa computed beta_2 in bfloat16, where 0.999 rounds to 1.0: sma_inf is infinite and
    # the step never rectifies, so with a 1e-3 gradient the variable barely moves.
    reference = _constant_gradient_run("float32")
    got = _constant_gradient_run("bfloat16")
    unrectified_move = 12 * 0.1 * 1e-3
    assert np.all(1.0 - reference > 10 * unrectified_move)  # rectified steps are ~lr each
    np.testing.assert_allclose(got, reference, rtol=2e-2)


def test_float16_step_count_does_not_saturate():
    # float16 cannot represent a step above 65504; tfa's coefficients became inf/NaN there.
    assert not np.isfinite(tf.cast(70_001, tf.float16).numpy())
    reference = _constant_gradient_run("float32", steps=2, iterations=70_000, grad=1.0)
    got = _constant_gradient_run("float16", steps=2, iterations=70_000, grad=1.0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference, rtol=1e-3)


def test_effective_learning_rate_follows_warmup_and_reaches_callbacks():
    opt = radam_dist.RectifiedAdam(learning_rate=1.0, total_steps=10, warmup_proportion=0.2, min_lr=0.1)
    # step 1 of a 2-step warmup: lr * 1/2; after the warmup, linear decay to min_lr.
    assert float(opt.effective_learning_rate) == pytest.approx(0.5)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=opt, loss="mse")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs["effective_learning_rate"])

    x, y = np.ones((6, 2), np.float32), np.ones((6, 1), np.float32)
    model.fit(x, y, batch_size=1, epochs=1, verbose=0,
              callbacks=[radam_dist.EffectiveLearningRate(), Record()])
    # after step k the logged rate is the one step k+1 applies
    expected = [1.0, 1.0 - 0.9 / 8 * 1, 1.0 - 0.9 / 8 * 2, 1.0 - 0.9 / 8 * 3,
                1.0 - 0.9 / 8 * 4, 1.0 - 0.9 / 8 * 5]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_lookahead_learning_rate_is_the_inner_one_and_reduce_lr_on_plateau_works():
    inner = radam_dist.RectifiedAdam(learning_rate=0.1)
    opt = radam_dist.Lookahead(inner)
    assert float(opt.learning_rate) == pytest.approx(0.1)
    opt.learning_rate = 0.05
    assert float(inner.learning_rate) == pytest.approx(0.05)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=opt, loss="mse")
    x, y = np.ones((4, 2), np.float32), np.zeros((4, 1), np.float32)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[plateau])  # reduces after epochs 2 and 3
    assert float(inner.learning_rate) == pytest.approx(0.0125)


def test_lookahead_shares_the_inner_step_counter():
    inner = radam_dist.RectifiedAdam(0.01)
    opt = radam_dist.Lookahead(inner, sync_period=4)
    variables = _vars()
    _run(opt, variables, 5)
    assert opt.iterations is inner.iterations
    assert int(inner.iterations.numpy()) == 5
    assert opt.get_slot_names() == ["m", "v", "slow"]
    assert len(opt.get_weights()) == 1 + 2 * 2 + 2


def test_lookahead_syncs_every_k_steps_and_slow_weights_start_at_the_variables():
    variables = _vars()
    start = [v.numpy().copy() for v in variables]
    opt = radam_dist.Lookahead(radam_dist.RectifiedAdam(0.05), sync_period=3, slow_step_size=0.5)
    _run(opt, variables, 2)
    for v, s in zip(variables, start):
        np.testing.assert_array_equal(opt.get_slot(v, "slow").numpy(), s)  # untouched before k
    fast_before_sync = None
    inner = radam_dist.RectifiedAdam(0.05)  # the same inner trajectory without Lookahead
    shadow = _vars()
    _run(inner, shadow, 3)
    fast_before_sync = [v.numpy() for v in shadow]
    _run(opt, variables, 1, start=2)
    for v, s, f in zip(variables, start, fast_before_sync):
        expected = s + np.float32(0.5) * (f - s)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
        np.testing.assert_array_equal(opt.get_slot(v, "slow").numpy(), v.numpy())


def test_lookahead_sparse_table_is_only_rewritten_inside_the_sync_branch():
    table = keras.Variable(np.zeros((50, 4), np.float32), name="table")
    opt = radam_dist.Lookahead(radam_dist.RectifiedAdam(0.01), sync_period=5)
    opt.build([table])
    grad = tf.IndexedSlices(tf.ones((2, 4)), tf.constant([1, 3]), tf.constant([50, 4]))

    @tf.function
    def step(g):
        opt.apply_gradients([(g, table)])

    graph = step.get_concrete_function(grad).graph
    table_handle = [inner for outer, inner in graph.captures if outer is table.value.handle]
    assert table_handle, "the table's handle is captured by the step"
    writers = {op.type for op in graph.get_operations() if op.inputs and op.inputs[0] is table_handle[0]}
    # The sparse RAdam update scatters into the touched rows. tfa also assigned the whole
    # table (var.assign(where(sync, ...))) on every step; here the only full-table write
    # lives in the sync branch of a cond (its own function graph, not the step's).
    assert "ResourceScatterAdd" in writers
    assert "AssignVariableOp" not in writers, writers
    assert any(op.type in ("If", "StatelessIf") for op in graph.get_operations())


# -- what tfa 0.23's own test files check (written here; tfa's tests are not shipped) -----------


def _dense_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights([np.arange(6.0, dtype=np.float32).reshape(3, 2) / 10,
                       np.array([0.1, -0.2], np.float32)])
    return model


def _one_step_with_rate(make, rate, compiled):
    """The model's weights after 3 steps at `rate`: once set through `opt.lr` after the
    step function was traced (or used eagerly), once given to the constructor."""
    x = tf.constant(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))

    def run(opt, set_lr_after_first):
        model = _dense_model()

        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x)))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        step = tf.function(step) if compiled else step
        step()
        if set_lr_after_first:
            opt.lr = rate
        step()
        step()
        return model.get_weights(), opt

    changed, opt = run(make(0.001), True)
    assert float(opt.lr) == pytest.approx(rate)
    assert float(opt.learning_rate) == pytest.approx(rate)
    want_opt = make(0.001)
    model = _dense_model()
    # reference: step 1 at 0.001, steps 2-3 at `rate`, through `learning_rate`
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x)))
    want_opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                 model.trainable_variables))
    want_opt.learning_rate = rate
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)))
        want_opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                     model.trainable_variables))
    unchanged, _ = run(make(0.001), False)
    return changed, model.get_weights(), unchanged


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("kind", ["radam", "lookahead"])
def test_lr_alias_changes_the_rate_used_by_the_next_step(kind, compiled):
    """tfa's test_model_dynamic_lr: `opt.lr = 1e-4` is the rate the next steps use, in eager
    and in a tf.function traced before the change, also through Lookahead."""
    def make(rate):
        radam = radam_dist.RectifiedAdam(learning_rate=rate)
        return radam if kind == "radam" else radam_dist.Lookahead(radam, sync_period=2)

    changed, expected, unchanged = _one_step_with_rate(make, 1e-4, compiled)
    for a, b in zip(changed, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(changed, unchanged))
    assert moved > 1e-5, "the rate really changed the steps"


def test_lr_is_learning_rate_on_every_optimizer():
    inner = radam_dist.RectifiedAdam(lr=0.02)
    lookahead = radam_dist.Lookahead(inner)
    assert float(inner.lr) == pytest.approx(0.02) and float(lookahead.lr) == pytest.approx(0.02)
    lookahead.lr = 0.5
    assert float(inner.learning_rate) == pytest.approx(0.5)
    inner.lr = 0.25
    assert float(lookahead.lr) == pytest.approx(0.25)
    # tf.keras's lr was the variable: read_value() and assign() work on it, as tfa's tests do
    np.testing.assert_allclose(lookahead.lr.read_value(), 0.25)
    lookahead.lr.assign(0.125)
    assert float(inner.learning_rate) == pytest.approx(0.125)
    keras_adam = radam_dist.Lookahead("adam", sync_period=10, slow_step_size=0.4)
    keras_adam.lr = 1e-4  # any Keras 3 inner optimizer
    np.testing.assert_allclose(keras_adam.lr.read_value(), 1e-4)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert float(radam_dist.RectifiedAdam(schedule).lr) == pytest.approx(0.1)
    hvd_module = pytest.importorskip("radam_dist.horovod")
    distributed = hvd_module.DistributedOptimizer(radam_dist.RectifiedAdam(0.03))
    assert float(distributed.lr) == pytest.approx(0.03)
    distributed.lr = 0.125
    assert float(distributed.inner_optimizer.learning_rate) == pytest.approx(0.125)
    assert float(distributed.learning_rate) == pytest.approx(0.125)


@pytest.mark.parametrize("rate", [1e-4, 1e-3, 0.1, 3e-5, 1.0])
def test_get_config_returns_the_learning_rate_as_given(rate):
    """tfa's test_get_config: the value given, not its float32 (1e-4, not 9.9999997e-05)."""
    assert radam_dist.RectifiedAdam(lr=rate).get_config()["learning_rate"] == rate
    assert radam_dist.RectifiedAdam(learning_rate=rate).get_config()["learning_rate"] == rate
    config = radam_dist.Lookahead(radam_dist.RectifiedAdam(rate), sync_period=4,
                                  slow_step_size=0.25).get_config()
    assert config["optimizer"]["config"]["learning_rate"] == rate
    assert (config["sync_period"], config["slow_step_size"]) == (4, 0.25)
    opt = radam_dist.RectifiedAdam(rate)
    opt.lr = 0.5  # changed: the rate it has now
    assert opt.get_config()["learning_rate"] == 0.5
    opt.lr = 1e-4
    assert opt.get_config()["learning_rate"] == pytest.approx(1e-4, rel=1e-7)


@pytest.mark.parametrize("loss_kind", ["callable", "tensor-and-tape"])
@pytest.mark.parametrize("kind", ["radam", "lookahead"])
def test_minimize_takes_keras_variables(kind, loss_kind):
    """minimize(loss, model.trainable_variables) with a callable loss, and a tensor loss with
    its tape, on a Keras model and on standalone keras.Variables, as apply_gradients does."""
    def make():
        radam = radam_dist.RectifiedAdam(0.05)
        return radam if kind == "radam" else radam_dist.Lookahead(radam, sync_period=2)

    x = tf.constant(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))
    model, ref_model = _dense_model(), _dense_model()
    loose, ref_loose = keras.Variable([1.0, -2.0]), keras.Variable([1.0, -2.0])
    opt, ref = make(), make()

    def loss_of(m, v):
        return tf.reduce_mean(tf.square(m(x))) + tf.reduce_sum(v * v)

    for _ in range(3):
        variables = model.trainable_variables + [loose]
        if loss_kind == "callable":
            opt.minimize(lambda: loss_of(model, loose), variables)
        else:
            with tf.GradientTape() as tape:
                loss = loss_of(model, loose)
            opt.minimize(loss, variables, tape=tape)
        ref_vars = ref_model.trainable_variables + [ref_loose]
        with tf.GradientTape() as tape:
            loss = loss_of(ref_model, ref_loose)
        ref.apply_gradients(zip(tape.gradient(loss, ref_vars), ref_vars))
    assert int(opt.iterations.numpy()) == 3
    for a, b in zip(model.get_weights() + [loose.numpy()],
                    ref_model.get_weights() + [ref_loose.numpy()]):
        np.testing.assert_array_equal(a, b)
