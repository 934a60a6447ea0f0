"""Checkpoints of sharded and accumulating optimizer state (issue 24, items 4 and 5).

* ZeRO-1 under MultiWorkerMirroredStrategy, real worker processes (``radam-dist launch``,
  TF_CONFIG), ``model.fit`` as Keras scripts write it: Keras' ``ModelCheckpoint`` on the
  chief only fails at the first save on **both** workers with radam_dist's "every worker must
  save" (it used to kill both with TensorFlow's "Collective instance 600 expected type 0 and
  data_type 1 but got type 2 and data_type 3"), and so does a chief-only ``model.save``
  after ``fit``; ``radam_dist.callbacks.ModelCheckpoint`` on every worker saves, the chief's
  file loads in a plain process and holds the state of the optimizer that trained.
* ``accumulation_steps``: a checkpoint / ``.keras`` file taken in the middle of an
  accumulation holds the sum of every replica's partial sums, so the steps after a restore
  are those of the uninterrupted run (they drifted by 0.0069 when only the first replica's
  sums were kept), with ZeRO on and off, restored under two replicas and without a strategy.
* A checkpoint of the earlier ZeRO layout (slots under ``sharded_state``) is refused with
  radam_dist's ``OldZeroCheckpoint`` as it is restored (it restored without m and v before,
  with only TensorFlow's warning).
"""

import json
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import radam_dist
from radam_dist.distribute import state_layout

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402
import trajectory as t  # noqa: E402

pytestmark = pytest.mark.timeout(200)

DATA = t.make_data()
SCRIPT = str(ch.SCRIPTS / "zero_chief_checkpoint.py")


def _mirrored(n=2):
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])


def _batch(k, lo=None, hi=None):
    ids, feats, y = DATA
    sl = slice(k * t.GLOBAL_BATCH, (k + 1) * t.GLOBAL_BATCH)
    return ids[sl][lo:hi], feats[sl][lo:hi], y[sl][lo:hi]


class Run:
    """trajectory.py's model with RectifiedAdam(accumulation_steps=3) (Lookahead around it
    for "ranger"), stepped by hand; one call of ``steps`` is one micro-batch each."""

    def __init__(self, kind, strategy, zero, model=None, optimizer=None):
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self.model = model or t.build_model()
            if optimizer is None:
                radam = radam_dist.RectifiedAdam(learning_rate=0.02, weight_decay=0.01,
                                                 accumulation_steps=3,
                                                 shard_optimizer_state=zero)
                optimizer = radam if kind == "radam" else radam_dist.Lookahead(
                    radam, sync_period=2, slow_step_size=0.5)
            self.optimizer = optimizer
            self.optimizer.build(self.model.trainable_variables)

        self._step = t.distributed_step(self.strategy, self.model, self.optimizer)

    def steps(self, first, last):
        return t.steps_by_hand(self.strategy, self._step, self.model, _batch, first, last)


def _assert_trajectory(got, want, first):
    assert len(got) == len(want) > 0
    for k, (g_step, w_step) in enumerate(zip(got, want)):
        for g, w in zip(g_step, w_step):
            np.testing.assert_allclose(g, w, rtol=ch.RTOL, atol=ch.ATOL,
                                       err_msg=f"micro-step {first + k + 1}")


def _inner(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)


# -- 5a: mid-accumulation state is every replica's -------------------------------------------
@pytest.mark.parametrize("zero", [True, False], ids=["zero", "replicated"])
@pytest.mark.parametrize("kind", ["radam", "ranger"])
def test_mid_accumulation_checkpoint_holds_every_replicas_partial_sums(kind, zero, tmp_path):
    """Two replicas, accumulation 3: 5 micro-batches (one step applied, two micro-batches
    pending, each replica's own partial sums), checkpoint, then the next 4 micro-batches
    restored under two replicas (same layout) and without a strategy equal the writer's."""
    writer = Run(kind, _mirrored(), zero)
    writer.steps(0, 5)
    inner = _inner(writer.optimizer)
    assert int(inner.accumulated_micro_steps.numpy()) == 5
    assert int(writer.optimizer.iterations.numpy()) == 1
    # the accumulators read from outside are the sum over the replicas of their copies
    for acc in inner._accumulators:
        copies = writer.strategy.experimental_local_results(acc.value)
        assert len(copies) == 2 and np.abs(copies[1].numpy()).max() > 0
        np.testing.assert_allclose(np.asarray(tf.convert_to_tensor(acc)),
                                   copies[0].numpy() + copies[1].numpy(), rtol=1e-6)
    path = tf.train.Checkpoint(model=writer.model, optimizer=writer.optimizer).save(
        str(tmp_path / "ckpt"))
    want = writer.steps(5, 9)  # the uninterrupted run: applies at micro-steps 6 and 9
    for where in ("mirrored", "no strategy"):
        reader = Run(kind, _mirrored() if where == "mirrored" else None, zero)
        tf.train.Checkpoint(model=reader.model, optimizer=reader.optimizer).restore(
            path).assert_consumed()
        _assert_trajectory(reader.steps(5, 9), want, 5)


def test_mid_accumulation_keras_file_holds_every_replicas_partial_sums(tmp_path):
    """The same through a .keras file (model.save / load_model), ZeRO x2 -> ZeRO x2."""
    writer = Run("radam", _mirrored(), True)
    writer.model.compile(optimizer=writer.optimizer, loss="mse")
    writer.steps(0, 4)
    path = str(tmp_path / "mid.keras")
    writer.model.save(path)
    want = writer.steps(4, 7)
    strategy = _mirrored()
    with strategy.scope():
        loaded = keras.models.load_model(path)
    reader = Run("radam", strategy, True, model=loaded, optimizer=loaded.optimizer)
    _assert_trajectory(reader.steps(4, 7), want, 4)


# -- 5b: the earlier ZeRO layout is refused ----------------------------------------------------
class _OldShardedState(tf.__internal__.tracking.Trackable):
    """What radam_dist's ZeRO-1 checkpointed before the state layouts: every whole slot under
    ``{variable index}_{slot}`` of a child ``sharded_state`` of the optimizer."""

    def __init__(self, shapes, names):
        self._tensors = {f"{i}_{name}": tf.fill(shape, 0.5)
                         for name in names for i, shape in enumerate(shapes)}

    def _serialize_to_tensors(self):
        return dict(self._tensors)


def _old_layout_checkpoint(tmp_path, kind):
    model = t.build_model()
    shapes = [v.shape for v in model.trainable_variables]
    old = tf.Module()
    old._variables = [tf.Variable(4, dtype=tf.int64), tf.Variable(0.02)]  # no slots in it
    old.sharded_state = _OldShardedState(shapes, ("m", "v"))
    if kind == "ranger":
        inner = old
        old = tf.Module()
        old._variables = [tf.Variable(4, dtype=tf.int64)]
        old.inner_optimizer = inner
        old.sharded_state = _OldShardedState(shapes, ("slow",))
    return tf.train.Checkpoint(model=model, optimizer=old).save(str(tmp_path / "old"))


@pytest.mark.parametrize("when", ["built", "before-build"])
@pytest.mark.parametrize("where", ["zero", "replicated", "no strategy"])
@pytest.mark.parametrize("kind", ["radam", "ranger"])
def test_checkpoint_of_the_earlier_zero_layout_is_refused(kind, where, when, tmp_path):
    path = _old_layout_checkpoint(tmp_path, kind)
    strategy = None if where == "no strategy" else _mirrored()
    with (strategy or tf.distribute.get_strategy()).scope():
        model = t.build_model()
        optimizer = t.make_optimizer(kind, "zero" if where == "zero" else "plain")
        if when == "built":
            optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    with pytest.raises(state_layout.OldZeroCheckpoint, match="earlier ZeRO-1 layout") as err:
        checkpoint.restore(path)
    assert "sharded_state" in str(err.value) and "expect_partial" in str(err.value)


def test_the_model_alone_restores_from_the_earlier_zero_layout(tmp_path):
    """The way out the message gives: the model's weights restore, the optimizer is new."""
    path = _old_layout_checkpoint(tmp_path, "radam")
    model = t.build_model()
    for v in model.trainable_variables:
        v.assign(tf.zeros_like(v))
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    assert any(np.abs(v.numpy()).max() > 0 for v in model.trainable_variables)


def test_new_checkpoints_restore_and_carry_no_old_layout_node(tmp_path):
    """A checkpoint written now restores into every layout (assert_consumed) and has no
    ``sharded_state`` key."""
    strategy = _mirrored()
    with strategy.scope():
        model = t.build_model()
        optimizer = t.make_optimizer("ranger", "zero")
        optimizer.build(model.trainable_variables)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "new"))
    assert not any("sharded_state" in name for name, _ in tf.train.list_variables(path))
    model2 = t.build_model()
    optimizer2 = t.make_optimizer("ranger")
    optimizer2.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=optimizer2).restore(path).assert_consumed()


# -- 4: ZeRO under MWMS, a chief-only checkpoint -------------------------------------------------
def _launch(tmp_path, mode, timeout=150):
    out = tmp_path / f"{mode}.json"
    code, log = ch.launch(2, 0, [SCRIPT, "--mode", mode, "--dir", str(tmp_path / mode),
                                 "--out", str(out)], timeout,
                          env={"RADAM_DIST_ZERO_READ_TIMEOUT": "8"})
    return code, log, out


REFUSAL = "every worker must save"


@pytest.mark.parametrize("mode", ["keras-checkpoint-on-chief", "save-on-chief-after-fit"])
def test_chief_only_save_fails_on_every_worker_with_every_worker_must_save(tmp_path, mode):
    code, log, _ = _launch(tmp_path, mode)
    assert code != 0, log[-4000:]
    assert "Collective instance" not in log, log[-4000:]
    for worker in ("[worker:0", "[worker:1"):
        lines = [line for line in log.splitlines() if line.startswith(worker)]
        assert any(REFUSAL in line for line in lines), (worker, log[-6000:])
    assert "trained" in log, "the workers must have trained before the first save"


def test_radam_dist_model_checkpoint_on_every_worker_saves(tmp_path):
    code, log, out = _launch(tmp_path, "radam-dist-checkpoint")
    assert code == 0, log[-6000:]
    result = json.loads(out.read_text())
    saved = sorted(p.name for p in (tmp_path / "radam-dist-checkpoint").iterdir())
    assert saved == ["epoch-1.keras", "epoch-2.keras"], saved  # the chief's files only
    other = json.loads(pathlib.Path(f"{out}.1").read_text())  # worker 1's view
    assert result["scratch_left"] == other["scratch_left"] == []  # scratch copies deleted
    for g, w in zip(other["weights"], result["weights"]):  # the same whole state on both
        np.testing.assert_allclose(g, w, rtol=0, atol=0)
    loaded = keras.models.load_model(tmp_path / "radam-dist-checkpoint" / "epoch-2.keras")
    got = loaded.optimizer.get_weights()
    assert len(got) == len(result["weights"])
    for g, w in zip(got, result["weights"]):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert int(loaded.optimizer.iterations.numpy()) == result["iterations"] > 0
