"""The optimizer state is whole in every layout (radam_dist/distribute/state_layout.py).

ZeRO-1 (``shard_optimizer_state=True``) under MirroredStrategy over two logical CPUs keeps
half of each slot per replica, yet ``weights`` / ``get_weights`` / ``set_weights`` /
``get_slot`` / ``.keras`` files / ``tf.train.Checkpoint`` all see the whole state, in the
replicated layout's order and keys. Every test compares with the unsharded one-device run
(tests/distribute_scripts/trajectory.py's model: an Embedding with sparse gradients and a
Dense layer, 10 steps on the same global batches), and moves the state between layouts:
ZeRO on two replicas, ZeRO on one, no strategy at all.

Each test makes its own MirroredStrategy objects, several per test and many per process, on
purpose: TensorFlow reuses collective keys across strategy objects (collective_keys.py).
"""

import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import radam_dist

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402
import trajectory as t  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # a collective that waits forever fails the test

DATA = t.make_data()
SPLIT = 4  # steps before the state moves to another layout; 10 in all


def _mirrored(n=2):
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])


def _batch(k, lo=None, hi=None):
    ids, feats, y = DATA
    sl = slice(k * t.GLOBAL_BATCH, (k + 1) * t.GLOBAL_BATCH)
    return ids[sl][lo:hi], feats[sl][lo:hi], y[sl][lo:hi]


class Run:
    """A model and its optimizer under a strategy (None: no strategy), stepped by hand."""

    def __init__(self, kind, strategy=None, zero=False, model=None, optimizer=None,
                 build=True):
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self.model = model or t.build_model()
            self.optimizer = optimizer or t.make_optimizer(kind, "zero" if zero else "plain")
            if build:  # otherwise built lazily, inside the first step
                self.optimizer.build(self.model.trainable_variables)
        if optimizer is None:  # ZeRO really shards under a strategy, and only there
            inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
            sharded = zero and strategy is not None
            assert inner._state_layout.shards_state == sharded
            assert self.optimizer._state_layout.shards_state == sharded

        self._step = t.distributed_step(self.strategy, self.model, self.optimizer)

    def steps(self, first, last):
        return t.steps_by_hand(self.strategy, self._step, self.model, _batch, first, last)


def _assert_trajectory(got, want, first=0):
    assert len(got) == len(want)
    for k, (g_step, w_step) in enumerate(zip(got, want)):
        for g, w in zip(g_step, w_step):
            np.testing.assert_allclose(g, w, rtol=ch.RTOL, atol=ch.ATOL,
                                       err_msg=f"step {first + k + 1}")


@pytest.fixture(scope="module", params=["radam", "ranger"])
def reference(request):
    """The unsharded one-device run: its 10 steps and its state after SPLIT steps."""
    run = Run(request.param)
    head = run.steps(0, SPLIT)
    state = run.optimizer.get_weights()
    slots = {name: [np.asarray(run.optimizer.get_slot(v, name))
                    for v in run.model.trainable_variables]
             for name in run.optimizer.get_slot_names()}
    tail = run.steps(SPLIT, t.STEPS)
    return dict(kind=request.param, trajectory=head + tail, state=state, slots=slots,
                names=run.optimizer.get_slot_names(), weights_len=len(run.optimizer.weights))


def test_zero_weights_get_weights_and_get_slot_are_whole(reference):
    run = Run(reference["kind"], _mirrored(), zero=True)
    _assert_trajectory(run.steps(0, SPLIT), reference["trajectory"][:SPLIT])
    opt = run.optimizer
    assert opt.get_slot_names() == reference["names"]
    assert len(opt.weights) == reference["weights_len"]  # 7 (RAdam) / 10 (Lookahead)
    got = opt.get_weights()
    assert len(got) == len(reference["state"])
    for g, w in zip(got, reference["state"]):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=ch.RTOL, atol=ch.ATOL)
    for name, slots in reference["slots"].items():
        for var, want in zip(run.model.trainable_variables, slots):
            whole = opt.get_slot(var, name)  # a gathered copy
            assert tuple(whole.shape) == tuple(var.shape)
            np.testing.assert_allclose(np.asarray(whole), want, rtol=ch.RTOL, atol=ch.ATOL)
    with pytest.raises(KeyError, match="its slots are"):
        opt.get_slot(run.model.trainable_variables[0], "nope")


def test_zero_set_weights_scatters_the_unsharded_state(reference):
    """The unsharded optimizer's get_weights() after 4 steps, set into a ZeRO optimizer on
    two replicas (and on one): the next 6 steps are the one-device run's."""
    for n in (2, 1):
        model = t.build_model()
        start = Run(reference["kind"])  # only for the model weights after 4 steps
        start.steps(0, SPLIT)
        model.set_weights(start.model.get_weights())
        run = Run(reference["kind"], _mirrored(n), zero=True)
        run.model.set_weights(start.model.get_weights())
        run.optimizer.set_weights(reference["state"])
        assert int(run.optimizer.iterations.numpy()) == SPLIT
        _assert_trajectory(run.steps(SPLIT, t.STEPS), reference["trajectory"][SPLIT:], SPLIT)


def _compiled(run):
    run.model.compile(optimizer=run.optimizer, loss="mse")
    return run


def test_keras_file_from_zero_restores_the_whole_state_anywhere(reference, tmp_path):
    kind = reference["kind"]
    run = _compiled(Run(kind, _mirrored(), zero=True))
    run.steps(0, SPLIT)
    path = str(tmp_path / "zero.keras")
    run.model.save(path)
    for where in ("no strategy", "mirrored x2", "mirrored x1"):
        strategy = None if where == "no strategy" else _mirrored(int(where[-1]))
        with (strategy or tf.distribute.get_strategy()).scope():
            loaded = keras.models.load_model(path)
        opt = loaded.optimizer
        assert opt.get_slot_names() == reference["names"], where
        for g, w in zip(opt.get_weights(), reference["state"]):
            np.testing.assert_allclose(g, w, rtol=ch.RTOL, atol=ch.ATOL, err_msg=where)
        resumed = Run(kind, strategy, model=loaded, optimizer=opt)
        _assert_trajectory(resumed.steps(SPLIT, t.STEPS), reference["trajectory"][SPLIT:], SPLIT)


def test_keras_file_from_unsharded_loads_into_zero(reference, tmp_path):
    """A .keras file's optimizer state (save_own_variables' store) written unsharded loads
    into a ZeRO optimizer of the same configuration on two replicas."""
    kind = reference["kind"]
    run = _compiled(Run(kind))
    run.steps(0, SPLIT)
    path = str(tmp_path / "plain.keras")
    run.model.save(path)
    strategy = _mirrored()
    with strategy.scope():
        loaded = keras.models.load_model(path)
        inner = getattr(loaded.optimizer, "inner_optimizer", loaded.optimizer)
        assert not inner.shard_optimizer_state
    # the same file, with the optimizer's config switched to ZeRO before loading
    config = keras.optimizers.serialize(loaded.optimizer)
    inner_config = config["config"].get("optimizer", config)["config"]
    inner_config["shard_optimizer_state"] = True
    with strategy.scope():
        zero_opt = keras.optimizers.deserialize(config)
        model = t.build_model()
        model.compile(optimizer=zero_opt, loss="mse")
        zero_opt.build(model.trainable_variables)
    model.set_weights(loaded.get_weights())
    store = {}
    loaded.optimizer.save_own_variables(store)
    zero_opt.load_own_variables(store)
    resumed = Run(kind, strategy, model=model, optimizer=zero_opt)
    _assert_trajectory(resumed.steps(SPLIT, t.STEPS), reference["trajectory"][SPLIT:], SPLIT)


@pytest.mark.parametrize("direction", ["zero-to-plain", "plain-to-zero", "zero2-to-zero1"])
@pytest.mark.parametrize("when", ["built", "restored-before-build"])
def test_checkpoint_moves_between_zero_and_unsharded(reference, tmp_path, direction, when):
    """Checkpoints hold the replicated layout's keys whatever wrote them; restored before
    the optimizer is built (slots made in the first step), the values wait for the slots."""
    kind = reference["kind"]
    build = when == "built"
    write_zero = direction.startswith("zero")
    writer = Run(kind, _mirrored() if write_zero else None, zero=write_zero)
    writer.steps(0, SPLIT)
    path = tf.train.Checkpoint(model=writer.model, optimizer=writer.optimizer).save(
        str(tmp_path / "ckpt"))
    if direction == "zero-to-plain":
        reader = Run(kind, build=build)
    elif direction == "plain-to-zero":
        reader = Run(kind, _mirrored(), zero=True, build=build)
    else:
        reader = Run(kind, _mirrored(1), zero=True, build=build)
    status = tf.train.Checkpoint(model=reader.model, optimizer=reader.optimizer).restore(path)
    assert int(reader.optimizer.iterations.numpy()) == SPLIT
    if build:
        status.assert_consumed()  # every value found a home, every object was restored
        for g, w in zip(reader.optimizer.get_weights(), reference["state"]):
            np.testing.assert_allclose(g, w, rtol=ch.RTOL, atol=ch.ATOL)
    _assert_trajectory(reader.steps(SPLIT, t.STEPS), reference["trajectory"][SPLIT:], SPLIT)
    status.assert_consumed()


def test_sharded_optimizer_outside_a_strategy_is_the_unsharded_one(reference):
    """Lookahead(RectifiedAdam(shard_optimizer_state=True)) (or RectifiedAdam alone) in a
    plain process: one device holds the whole state; same trajectory as unsharded."""
    run = Run(reference["kind"], zero=True)
    assert run.optimizer._state_layout.kind == "replicated"
    _assert_trajectory(run.steps(0, t.STEPS), reference["trajectory"])


@pytest.mark.parametrize("variant", ["zero", "fp16", "acc4", "skipnan"])
def test_several_strategies_in_one_process(reference, variant):
    """A new MirroredStrategy per case, after the other tests' strategies: without distinct
    collective keys the first ZeRO all-gather after another strategy's all-reduce fails
    with 'Collective instance ... expected type'."""
    trajectory, extra = t.replicated_loop(_mirrored(), reference["kind"], DATA, variant)
    if variant == "fp16":  # float16 on the wire: bounded, not round-off
        deviation = max(float(np.abs(np.subtract(g, w)).max())
                        for gs, ws in zip(trajectory, reference["trajectory"])
                        for g, w in zip(gs, ws))
        assert 0.0 < deviation < 5e-4
    else:
        _assert_trajectory(trajectory, reference["trajectory"])
    assert extra["iterations"] == t.STEPS


# -- the gate's state (accumulation / non-finite skipping) under ZeRO ------------------------
# Under ZeRO the slots are not in Keras' variable list, yet the gate's variables are made
# after them (accumulators, accumulated_micro_steps, skipped_steps): a checkpoint restored
# before the optimizer is built must still hand each one its own value (logical position).
GATES = {"accumulation": dict(accumulation_steps=3), "skip_nonfinite": dict(skip_nonfinite=True)}


def _gated_run(kind, gate, strategy, zero, build=True):
    with strategy.scope():
        radam = radam_dist.RectifiedAdam(learning_rate=0.02, weight_decay=0.01,
                                         shard_optimizer_state=zero, **GATES[gate])
        opt = radam if kind == "radam" else radam_dist.Lookahead(
            radam, sync_period=t.SYNC_PERIOD, slow_step_size=0.5)
    run = Run(kind, strategy, optimizer=opt, build=build)
    assert radam._state_layout.shards_state == zero
    return run


def _poisoned_step(run, k):
    """One step whose features are NaN on every replica: skipped (skipped_steps + 1)."""
    n = run.strategy.num_replicas_in_sync
    per = t.GLOBAL_BATCH // n
    batch = run.strategy.experimental_distribute_values_from_function(
        lambda ctx: tuple(tf.constant(a) for a in (
            _batch(k, ctx.replica_id_in_sync_group * per,
                   (ctx.replica_id_in_sync_group + 1) * per)[0],
            np.full_like(_batch(k, 0, per)[1], np.nan),
            _batch(k, 0, per)[2])))
    run._step(*batch)


def _logical_state(run):
    """The whole logical state (what checkpoints and .keras files hold), as numpy."""
    return [np.array(tf.convert_to_tensor(v)) for v in run.optimizer._logical_variables()]


def _gate_values(run):
    inner = getattr(run.optimizer, "inner_optimizer", run.optimizer)
    return dict(iterations=int(run.optimizer.iterations.numpy()),
                micro=int(inner.accumulated_micro_steps.numpy()),
                skipped=int(inner.skipped_steps.numpy()),
                accumulators=[np.array(tf.convert_to_tensor(a)) for a in inner._accumulators],
                m=[np.asarray(inner.get_slot(v, "m")) for v in run.model.trainable_variables],
                v=[np.asarray(inner.get_slot(v, "v")) for v in run.model.trainable_variables])


def _assert_same_state(got_run, want_state, want_gate):
    got = _logical_state(got_run)
    assert len(got) == len(want_state)
    for g, w in zip(got, want_state):
        np.testing.assert_allclose(g, w, rtol=ch.RTOL, atol=ch.ATOL)
    gate = _gate_values(got_run)
    for key in ("iterations", "micro", "skipped"):
        assert gate[key] == want_gate[key], key
    for key in ("accumulators", "m", "v"):
        assert len(gate[key]) == len(want_gate[key]), key
        for g, w in zip(gate[key], want_gate[key]):
            np.testing.assert_allclose(g, w, rtol=ch.RTOL, atol=ch.ATOL, err_msg=key)


def _write_gated(kind, gate, zero, replicas=2):
    """4 micro-steps (accumulation 3: one step applied, one micro-batch pending) or 3 steps
    and one skipped NaN step; returns the run and its state."""
    writer = _gated_run(kind, gate, _mirrored(replicas), zero)
    if gate == "accumulation":
        writer.steps(0, 4)
    else:
        writer.steps(0, 2)
        _poisoned_step(writer, 2)
        writer.steps(2, 3)
    gate_values = _gate_values(writer)
    if gate == "accumulation":  # the state the test is about is really there
        assert gate_values["micro"] == 4 and gate_values["iterations"] == 1
        assert any(np.abs(a).max() > 0 for a in gate_values["accumulators"])
    else:
        assert gate_values["skipped"] == 1 and gate_values["iterations"] == 3
    return writer, _logical_state(writer), gate_values


@pytest.mark.parametrize("direction", ["zero-to-zero", "zero-to-plain", "plain-to-zero"])
@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("kind", ["radam", "ranger"])
def test_checkpoint_restored_before_build_keeps_the_gate_state(kind, gate, direction,
                                                               tmp_path):
    """tf.train.Checkpoint.restore() before the optimizer is built (restore, then train):
    accumulators, accumulated_micro_steps, skipped_steps, m and v are the saved ones, every
    checkpoint value is consumed, and training continues as the writer does.

    (Mid-accumulation, each replica's accumulators hold its own micro-batches' sum and a
    checkpoint keeps the first replica's, in every layout: with two replicas the
    continuation is compared for skip_nonfinite only; see the one-replica test below.)"""
    write_zero, read_zero = direction.split("-to-")[0] == "zero", direction.endswith("zero")
    writer, state, gate_values = _write_gated(kind, gate, write_zero)
    path = tf.train.Checkpoint(model=writer.model, optimizer=writer.optimizer).save(
        str(tmp_path / "ckpt"))
    reader = _gated_run(kind, gate, _mirrored(), read_zero, build=False)
    assert not reader.optimizer.built
    status = tf.train.Checkpoint(model=reader.model, optimizer=reader.optimizer).restore(path)
    with reader.strategy.scope():
        reader.optimizer.build(reader.model.trainable_variables)
    status.assert_consumed()  # no value left unclaimed ("could not be found")
    _assert_same_state(reader, state, gate_values)
    if gate == "skip_nonfinite":
        _assert_trajectory(reader.steps(3, 6), writer.steps(3, 6), 3)


@pytest.mark.parametrize("gate", sorted(GATES))
def test_checkpoint_restored_in_the_first_step_keeps_the_gate_state(gate, tmp_path):
    """The usual order: restore, then the first step builds the optimizer lazily (ZeRO on
    one replica: the layout is the same, and mid-accumulation state is all in the file)."""
    writer, _, _ = _write_gated("radam", gate, True, replicas=1)
    path = tf.train.Checkpoint(model=writer.model, optimizer=writer.optimizer).save(
        str(tmp_path / "ckpt"))
    reader = _gated_run("radam", gate, _mirrored(1), True, build=False)
    status = tf.train.Checkpoint(model=reader.model, optimizer=reader.optimizer).restore(path)
    first = 4 if gate == "accumulation" else 3
    got = reader.steps(first, first + 3)
    status.assert_consumed()
    _assert_trajectory(got, writer.steps(first, first + 3), first)
    assert _gate_values(reader)["skipped"] == _gate_values(writer)["skipped"]
    assert _gate_values(reader)["micro"] == _gate_values(writer)["micro"]


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("kind", ["radam", "ranger"])
def test_keras_file_keeps_the_gate_state_across_layouts(kind, gate, tmp_path):
    """A .keras file from ZeRO with the gate's state loads whole into ZeRO (two replicas),
    ZeRO off (two replicas) and no strategy."""
    writer, state, gate_values = _write_gated(kind, gate, True)
    _compiled(writer)
    path = str(tmp_path / "zero.keras")
    writer.model.save(path)
    for where in ("mirrored zero", "no strategy"):
        strategy = None if where == "no strategy" else _mirrored()
        with (strategy or tf.distribute.get_strategy()).scope():
            loaded = keras.models.load_model(path)
        resumed = Run(kind, strategy, model=loaded, optimizer=loaded.optimizer)
        assert resumed.optimizer._state_layout.shards_state == (strategy is not None), where
        _assert_same_state(resumed, state, gate_values)
    store = {}  # the file's optimizer state (save_own_variables' store) into ZeRO off
    loaded.optimizer.save_own_variables(store)
    plain = _gated_run(kind, gate, _mirrored(), False)
    plain.optimizer.load_own_variables(store)
    _assert_same_state(plain, state, gate_values)
