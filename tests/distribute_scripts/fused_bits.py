"""The fused (compiled, one set of chunks per device) step and the per-variable step
(``RADAM_DIST_FUSED=0``) under one strategy: every variable, every replica's copy and every
optimizer variable after a few steps, as float32 bit patterns, for tests/test_fused_strategies.py.

The model has an Embedding (sparse gradients: the per-variable path inside the fused step)
and two Dense layers. Imported by the test for MirroredStrategy in-process; run by
``radam-dist launch --workers 2`` for MultiWorkerMirroredStrategy:

    radam-dist launch --workers 2 -- python fused_bits.py --out result.json
"""

import argparse
import json
import os
import sys

import numpy as np
import tensorflow as tf

import keras

import radam_dist
from radam_dist import fused
from radam_dist import executor

GLOBAL_BATCH = 8
STEPS = 7  # Lookahead syncs after steps 3 and 6; RAdam rectifies from step 6
SYNC_PERIOD = 3
VOCAB = 12


def make_optimizer(kind):
    radam = radam_dist.RectifiedAdam(learning_rate=0.02, weight_decay=0.05, amsgrad=True)
    radam.exclude_from_weight_decay(var_names=["bias"])
    if kind == "radam":
        return radam
    return radam_dist.Lookahead(radam, sync_period=SYNC_PERIOD, slow_step_size=0.5)


def build_model():
    ids = keras.Input((3,), dtype="int32", name="ids")
    feats = keras.Input((4,), dtype="float32", name="feats")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(VOCAB, 4, name="embedding")(ids))
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")(
        keras.layers.Concatenate()([embedded, feats]))
    model = keras.Model([ids, feats], keras.layers.Dense(1, name="out")(hidden))
    rs = np.random.RandomState(3)
    model.set_weights([(0.3 * rs.randn(*w.shape)).astype("float32") for w in model.get_weights()])
    return model


def make_data():
    rs = np.random.RandomState(0)
    n = GLOBAL_BATCH * STEPS
    ids = rs.randint(0, VOCAB, size=(n, 3)).astype("int32")
    feats = rs.randn(n, 4).astype("float32")
    y = (feats.sum(axis=1, keepdims=True) + 0.1 * rs.randn(n, 1)).astype("float32")
    return ids, feats, y


def bits(values):
    """Every array as its uint32 bit pattern (equal bits, not close values)."""
    return [np.asarray(v, np.float32).view(np.uint32).ravel().tolist() for v in values]


def state_bits(strategy, model, optimizer):
    """Each replica's copy of every variable and every optimizer variable."""
    copies = []
    for var in list(model.weights) + list(optimizer.variables):
        value = var.value if isinstance(var, keras.Variable) else var
        copies += [c.numpy() for c in strategy.experimental_local_results(value)]
    return bits(copies)


def loop(strategy, kind, data):
    """strategy.run(train_step) in a tf.function, each replica on its slice of the batch."""
    ids, feats, y = data
    with strategy.scope():
        model, optimizer = build_model(), make_optimizer(kind)
    per_replica = GLOBAL_BATCH // strategy.num_replicas_in_sync

    def replica_step(r_ids, r_feats, r_y):
        with tf.GradientTape() as tape:
            pred = model([r_ids, r_feats], training=True)
            loss = tf.reduce_sum(tf.square(pred - r_y)) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(*batch):
        strategy.run(replica_step, args=batch)

    for k in range(STEPS):
        def value_fn(ctx, k=k):
            start = k * GLOBAL_BATCH + ctx.replica_id_in_sync_group * per_replica
            sl = slice(start, start + per_replica)
            return tf.constant(ids[sl]), tf.constant(feats[sl]), tf.constant(y[sl])

        train_step(*strategy.experimental_distribute_values_from_function(value_fn))
    return state_bits(strategy, model, optimizer)


def fit(strategy, kind, data):
    """model.fit on the global batch."""
    ids, feats, y = data
    with strategy.scope():
        model, optimizer = build_model(), make_optimizer(kind)
        model.compile(optimizer=optimizer, loss="mse")
    model.fit([ids, feats], y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return state_bits(strategy, model, optimizer)


def fused_and_plain(strategy, cases):
    """For each (mode, kind): the state after the per-variable run, after the fused run (the
    one-pass kernel where it serves, ``radam_dist.native``) and after the fused run on XLA
    chunks alone (``RADAM_DIST_NATIVE=0``); the devices the fused run's updates
    (``executor.update_dense``) were placed on; and how many updates the kernel applied in each."""
    from radam_dist import native

    data = make_data()
    real, real_native = executor.update_dense, native.apply_dense
    placed, natively = [], []

    def spy(updates, **kwargs):
        placed.append(kwargs.get("device"))
        return real(updates, **kwargs)

    def native_spy(update):
        natively.append(update)
        return real_native(update)

    switches = (fused.ENV_SWITCH, native.ENV_SWITCH)
    previous = {name: os.environ.get(name) for name in switches}
    results = {}
    executor.update_dense, native.apply_dense = spy, native_spy
    try:
        for mode, kind in cases:
            run = loop if mode == "loop" else fit
            case = {}
            for label, fused_on, native_on in (("plain", "0", "1"), ("fused", "1", "1"),
                                               ("xla", "1", "0")):
                os.environ[fused.ENV_SWITCH], os.environ[native.ENV_SWITCH] = fused_on, native_on
                del placed[:], natively[:]
                case[label] = run(strategy, kind, data)
                case[label + "_calls"], case[label + "_native"] = len(placed), len(natively)
                if label == "fused":
                    case["devices"] = sorted({str(d) for d in placed})
            results[f"{mode}-{kind}"] = case
    finally:
        executor.update_dense, native.apply_dense = real, real_native
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return results


def split_and_single_pack(strategy, kind="ranger"):
    """MWMS: the state after the loop with every dense gradient all-reduced on its own
    (``gradient_sums.all_reduce_large_apart`` with ``SPLIT_MIN_BYTES = 0``) and with Keras' single
    pack (``RADAM_DIST_ALL_REDUCE_SPLIT=0``), and per traced step how many gradients went one
    by one."""
    from radam_dist.distribute import gradient_sums

    data = make_data()
    real, threshold = gradient_sums.all_reduce_large_apart, gradient_sums.SPLIT_MIN_BYTES
    counted = []

    def spy(grads_and_vars, all_reduce_sum):
        counted.append(sum(gradient_sums._is_large(g) for g, _ in grads_and_vars))
        return real(grads_and_vars, all_reduce_sum)

    previous = os.environ.get(gradient_sums.SPLIT_SWITCH)
    out = {}
    gradient_sums.all_reduce_large_apart, gradient_sums.SPLIT_MIN_BYTES = spy, 0
    try:
        for label, switch in (("split", "1"), ("single", "0")):
            os.environ[gradient_sums.SPLIT_SWITCH] = switch
            del counted[:]
            out[label] = loop(strategy, kind, data)
            out[label + "_counted"] = list(counted)
    finally:
        gradient_sums.all_reduce_large_apart, gradient_sums.SPLIT_MIN_BYTES = real, threshold
        if previous is None:
            os.environ.pop(gradient_sums.SPLIT_SWITCH, None)
        else:
            os.environ[gradient_sums.SPLIT_SWITCH] = previous
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="loop-ranger")
    parser.add_argument("--split-check", action="store_true",
                        help="also compare the split all-reduce with Keras' single pack")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from radam_dist.distribute import enable_multi_worker_fit

    enable_multi_worker_fit()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    cases = [tuple(c.split("-")) for c in args.cases.split(",")]
    results = fused_and_plain(strategy, cases)
    task = os.environ.get("RADAM_DIST_TASK", "local").replace(":", "-")
    with open(f"{args.out}.{task}", "w") as f:
        json.dump({"num_replicas": strategy.num_replicas_in_sync, "cases": results,
                   "split": split_and_single_pack(strategy) if args.split_check else None}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
