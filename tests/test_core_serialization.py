"""Config, Keras serialization, .keras save / load / resume and tf.train.Checkpoint."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import radam_dist

SCHEDULE = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=3, decay_rate=0.5)


def _optimizers():
    return {
        "radam-float": radam_dist.RectifiedAdam(
            learning_rate=0.02, amsgrad=True, weight_decay=0.01, total_steps=20,
            warmup_proportion=0.15, min_lr=1e-4, sma_threshold=4.5, clipnorm=1.0,
        ),
        "radam-schedules": radam_dist.RectifiedAdam(
            learning_rate=SCHEDULE,
            weight_decay=keras.optimizers.schedules.PolynomialDecay(1e-3, 10, 1e-4),
            decay=0.01,
        ),
        "ranger": radam_dist.Lookahead(
            radam_dist.RectifiedAdam(0.01, global_clipnorm=0.5), sync_period=3, slow_step_size=0.6
        ),
    }


TFA_KEYS = {
    "name", "learning_rate", "beta_1", "beta_2", "decay", "weight_decay", "sma_threshold",
    "epsilon", "amsgrad", "total_steps", "warmup_proportion", "min_lr",
}


@pytest.mark.parametrize("key", sorted(_optimizers()))
def test_config_round_trip(key):
    opt = _optimizers()[key]
    config = opt.get_config()
    clone = opt.__class__.from_config(config)
    assert clone.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is type(opt)
    assert restored.get_config() == config
    if isinstance(opt, radam_dist.RectifiedAdam):
        assert TFA_KEYS <= set(config)


def test_tfa_config_dict_loads():
    # What tfa 0.23's tf.keras.optimizers.serialize(RectifiedAdam(...)) produced.
    tfa_config = {
        "class_name": "Addons>RectifiedAdam",
        "config": {
            "name": "RectifiedAdam", "learning_rate": 0.005, "beta_1": 0.9, "beta_2": 0.99,
            "decay": 0.0, "weight_decay": 0.001, "sma_threshold": 5.0, "epsilon": 1e-07,
            "amsgrad": True, "total_steps": 100, "warmup_proportion": 0.1, "min_lr": 1e-05,
            "clipnorm": 1.0, "is_legacy_optimizer": True,
        },
    }
    opt = keras.optimizers.deserialize(tfa_config)
    assert isinstance(opt, radam_dist.RectifiedAdam)
    assert (opt.beta_2, opt.amsgrad, opt.total_steps, opt.clipnorm) == (0.99, True, 100, 1.0)
    lookahead = keras.optimizers.deserialize({
        "class_name": "Addons>Lookahead",
        "config": {"name": "Lookahead", "optimizer": tfa_config, "sync_period": 5,
                   "slow_step_size": 0.5},
    })
    assert isinstance(lookahead, radam_dist.Lookahead)
    assert isinstance(lookahead.inner_optimizer, radam_dist.RectifiedAdam)
    schedule_config = dict(tfa_config, config=dict(tfa_config["config"], learning_rate={
        "class_name": "ExponentialDecay",
        "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.9,
                   "staircase": False, "name": None}}))
    opt = keras.optimizers.deserialize(schedule_config)
    assert isinstance(opt._learning_rate, keras.optimizers.schedules.ExponentialDecay)


def _model():
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(20, 4)(inputs)  # sparse gradients
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    return model


def _data(seed):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 20, size=(32, 5)).astype(np.int32), rng.randn(32, 1).astype(np.float32)


@pytest.mark.parametrize("key", sorted(_optimizers()))
def test_keras_save_load_resume_is_exact(tmp_path, key):
    keras.utils.set_random_seed(1)
    x, y = _data(0)
    straight = _model()
    straight.compile(optimizer=_optimizers()[key], loss="mse")
    initial = straight.get_weights()
    straight.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    resumed = _model()
    resumed.set_weights(initial)
    resumed.compile(optimizer=_optimizers()[key], loss="mse")
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    resumed.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(resumed.optimizer)
    assert int(loaded.optimizer.iterations.numpy()) == 4
    for a, b in zip(loaded.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key", ["radam-float", "ranger"])
def test_tf_train_checkpoint_restores_state(tmp_path, key):
    keras.utils.set_random_seed(2)
    x, y = _data(1)
    model = _model()
    model.compile(optimizer=_optimizers()[key], loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    expected = model.get_weights()

    other = _model()
    other.compile(optimizer=_optimizers()[key], loss="mse")
    other.optimizer.build(other.trainable_variables)
    tf.train.Checkpoint(model=other, optimizer=other.optimizer).restore(path).assert_consumed()
    assert int(other.optimizer.iterations.numpy()) == 4
    other.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(other.get_weights(), expected):
        np.testing.assert_array_equal(a, b)


def test_keras_state_that_does_not_fit_is_refused_not_skipped():
    """Keras 3 only warns and loads nothing when a .keras file's optimizer state has another
    number of arrays; here that is a ValueError, and the optimizer is left unchanged."""
    variables = [keras.Variable(np.ones((3, 2), np.float32)),
                 keras.Variable(np.ones(2, np.float32))]
    source = radam_dist.RectifiedAdam(amsgrad=True)
    source.apply_gradients(zip([tf.ones((3, 2)), tf.ones(2)], variables))
    store = {}
    source.save_own_variables(store)
    assert len(store) == 2 + 3 * 2  # iterations, learning rate, m, v, vhat per variable
    target = radam_dist.RectifiedAdam()
    target.build(variables)
    before = target.get_weights()
    with pytest.raises(ValueError, match="holds 8 arrays, this optimizer has 6"):
        target.load_own_variables(store)
    bad = dict(store)
    del bad["7"]
    with pytest.raises(ValueError, match="has shape"):
        target.load_own_variables({str(i): bad[str(i)] for i in range(6)} | {"5": np.zeros(5)})
    for a, b in zip(target.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key", ["radam-float", "ranger"])
def test_compiled_untrained_model_saves_and_loads(tmp_path, key):
    """Saved before the optimizer's first step, the file holds only the step count and the
    rate (Keras saves an unbuilt optimizer so): it loads, and trains as a fresh model."""
    keras.utils.set_random_seed(3)
    x, y = _data(2)
    model = _model()
    model.compile(optimizer=_optimizers()[key], loss="mse")
    model(x[:1])
    path = str(tmp_path / "untrained.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert int(loaded.optimizer.iterations.numpy()) == 0
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
