"""Train one small model under a tf.distribute strategy and on one device; write both
trajectories (every variable after every step) to JSON for tests/test_distribute_*.py.

The model has an Embedding (sparse IndexedSlices gradients) and a Dense layer (dense
gradients). Every case starts from the same weights and sees the same global batches.

    python trajectory.py --strategy mirrored --out result.json      # 2 logical CPUs
    radam-dist launch --workers 2 -- python trajectory.py --strategy mwms --out r.json
    radam-dist launch --workers 2 --ps 2 -- python trajectory.py --strategy pss --out r.json
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

GLOBAL_BATCH = 16
VOCAB = 24
STEPS = 10
SYNC_PERIOD = 3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["mirrored", "mwms", "pss"], required=True)
    parser.add_argument("--modes", default="loop,fit", help="comma list of loop, fit")
    parser.add_argument("--optimizers", default="radam,ranger")
    parser.add_argument("--variants", default="plain",
                        help="comma list: plain, fp16 (float16 all-reduce), acc4 (4 micro-batches "
                        "per step, accumulation_steps=4), skipnan (a NaN batch on replica 1 "
                        "before step 4, skip_nonfinite=True), zero (shard_optimizer_state=True)")
    parser.add_argument("--partition", action="store_true",
                        help="PSS: shard variables over the parameter servers")
    parser.add_argument("--fresh-strategy", action="store_true",
                        help="Mirrored / MWMS: a new strategy object for every case, so one "
                        "process runs several (TensorFlow reuses collective keys across them)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


args = parse_args() if __name__ == "__main__" else None

if args is not None and args.strategy == "pss":
    from radam_dist.distribute import serve_if_pss_worker_or_ps

    serve_if_pss_worker_or_ps()  # workers and parameter servers stop here

import tensorflow as tf  # noqa: E402

if args is not None and args.strategy == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )

import keras  # noqa: E402

import radam_dist  # noqa: E402
from radam_dist.distribute import enable_multi_worker_fit, expand_sharded, zero  # noqa: E402

logging.basicConfig(level=logging.INFO)


def make_data():
    rs = np.random.RandomState(0)
    n = GLOBAL_BATCH * STEPS
    ids = rs.randint(0, VOCAB, size=(n, 3)).astype("int32")
    feats = rs.randn(n, 4).astype("float32")
    y = (feats.sum(axis=1, keepdims=True) + 0.1 * rs.randn(n, 1)).astype("float32")
    return ids, feats, y


def initial_weights():
    rs = np.random.RandomState(1)
    return [
        (0.1 * rs.randn(VOCAB, 4)).astype("float32"),
        (0.3 * rs.randn(16, 1)).astype("float32"),
        np.zeros((1,), "float32"),
    ]


def build_model():
    ids = keras.Input((3,), dtype="int32", name="ids")
    feats = keras.Input((4,), dtype="float32", name="feats")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(VOCAB, 4, name="embedding")(ids))
    joined = keras.layers.Concatenate()([embedded, feats])
    output = keras.layers.Dense(1, name="dense")(joined)
    model = keras.Model([ids, feats], output)
    model.set_weights(initial_weights())
    return model


ACCUMULATE = 4


def make_optimizer(kind, variant="plain"):
    extra = {}
    if variant == "fp16":
        extra["all_reduce_dtype"] = "float16"
    elif variant == "acc4":
        extra["accumulation_steps"] = ACCUMULATE
    elif variant == "skipnan":
        extra["skip_nonfinite"] = True
    elif variant == "zero":
        extra["shard_optimizer_state"] = True
    radam = radam_dist.RectifiedAdam(learning_rate=0.02, weight_decay=0.01, **extra)
    if kind == "radam":
        return radam
    return radam_dist.Lookahead(radam, sync_period=SYNC_PERIOD, slow_step_size=0.5)


def flat_weights(model):
    return [w.ravel().tolist() for w in model.get_weights()]


def loss_fn(model, ids, feats, y, global_batch=GLOBAL_BATCH):
    pred = model([ids, feats], training=True)
    return tf.reduce_sum(tf.square(pred - y)) / global_batch


def distributed_step(strategy, model, optimizer, global_batch=GLOBAL_BATCH):
    """A tf.function running one GradientTape + apply_gradients step on every replica."""

    def replica_step(r_ids, r_feats, r_y):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, r_ids, r_feats, r_y, global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(*batch):
        strategy.run(replica_step, args=batch)

    return train_step


def steps_by_hand(strategy, train_step, model, batch, first, last):
    """Run ``train_step`` on global batches ``first`` .. ``last - 1``, each replica given its
    slice (``batch(k, lo, hi)``: rows lo:hi of global batch k); the flat weights after each."""
    n = strategy.num_replicas_in_sync
    per = GLOBAL_BATCH // n
    out = []
    for k in range(first, last):
        if n == 1:
            args = [tf.constant(a) for a in batch(k)]
        else:
            args = strategy.experimental_distribute_values_from_function(
                lambda ctx, k=k: tuple(tf.constant(a) for a in batch(
                    k, ctx.replica_id_in_sync_group * per,
                    (ctx.replica_id_in_sync_group + 1) * per)))
        train_step(*args)
        out.append(flat_weights(model))
    return out


def single_device(kind, data):
    """The reference: one device, the whole global batch per step."""
    ids, feats, y = data
    model, optimizer = build_model(), make_optimizer(kind)
    trajectory, sparse = [], False
    for k in range(STEPS):
        sl = slice(k * GLOBAL_BATCH, (k + 1) * GLOBAL_BATCH)
        with tf.GradientTape() as tape:
            loss = loss_fn(model, ids[sl], feats[sl], y[sl])
        grads = tape.gradient(loss, model.trainable_variables)
        sparse = sparse or isinstance(grads[0], tf.IndexedSlices)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        trajectory.append(flat_weights(model))
    return trajectory, sparse


def replicated_loop(strategy, kind, data, variant="plain"):
    """strategy.run + GradientTape + apply_gradients, each replica on its slice.

    Variant acc4: each global batch is fed as 4 micro-batches, one apply_gradients each."""
    ids, feats, y = data
    with strategy.scope():
        model, optimizer = build_model(), make_optimizer(kind, variant)
    micro = ACCUMULATE if variant == "acc4" else 1
    micro_batch = GLOBAL_BATCH // micro
    per_replica = micro_batch // strategy.num_replicas_in_sync

    train_step = distributed_step(strategy, model, optimizer, micro_batch)

    trajectory, extra = [], {}
    for k in range(STEPS * micro):
        def value_fn(ctx, k=k, poison=False):
            start = k * micro_batch + ctx.replica_id_in_sync_group * per_replica
            sl = slice(start, start + per_replica)
            r_feats = feats[sl]
            if poison and ctx.replica_id_in_sync_group == strategy.num_replicas_in_sync - 1:
                r_feats = np.full_like(r_feats, np.nan)
            return tf.constant(ids[sl]), tf.constant(r_feats), tf.constant(y[sl])

        if variant == "skipnan" and k == 3:  # one bad replica must not poison the model
            before = flat_weights(model)
            poisoned = strategy.experimental_distribute_values_from_function(
                lambda ctx: value_fn(ctx, poison=True))
            train_step(*poisoned)
            extra["unchanged_by_nan_step"] = flat_weights(model) == before
        batch = strategy.experimental_distribute_values_from_function(value_fn)
        train_step(*batch)
        if (k + 1) % micro == 0:
            trajectory.append(flat_weights(model))
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    extra["iterations"] = int(optimizer.iterations.numpy())
    extra["state_bytes_per_replica"] = zero.state_bytes_per_replica(optimizer)
    if hasattr(inner, "skipped_steps"):
        extra["skipped_steps"] = int(inner.skipped_steps.numpy())
    return trajectory, extra


def replicated_fit(strategy, kind, data):
    """model.fit on the global batch (Keras splits it across replicas and workers)."""
    ids, feats, y = data
    with strategy.scope():
        model, optimizer = build_model(), make_optimizer(kind)
        model.compile(optimizer=optimizer, loss="mse")
    trajectory = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: trajectory.append(flat_weights(model))
    )
    model.fit([ids, feats], y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
              verbose=0, callbacks=[record])
    return trajectory


def parameter_server_loop(strategy, kind, data):
    """ClusterCoordinator.schedule: each step on whichever worker is free, one at a time."""
    ids, feats, y = (tf.constant(a) for a in data)
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        model, optimizer = build_model(), make_optimizer(kind)

    # A Keras variable that wraps a ShardedVariable cannot be a tape source: use the shards.
    variables = expand_sharded(model.trainable_variables)

    def replica_step(r_ids, r_feats, r_y):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, r_ids, r_feats, r_y)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))

    @tf.function
    def train_step(k):
        start = k * GLOBAL_BATCH
        batch = (ids[start:start + GLOBAL_BATCH], feats[start:start + GLOBAL_BATCH],
                 y[start:start + GLOBAL_BATCH])
        strategy.run(replica_step, args=batch)

    trajectory = []
    for k in range(STEPS):
        coordinator.schedule(train_step, args=(tf.constant(k),))
        coordinator.join()
        trajectory.append(flat_weights(model))
    extra = {"placement": slot_placement(model, optimizer)}
    return trajectory, extra


def slot_placement(model, optimizer):
    """Device of every shard of every variable and of its slots (PSS placement check)."""
    from radam_dist.distribute.pss import describe_placement

    return describe_placement(model.trainable_variables, optimizer)


def main():
    data = make_data()
    task = os.environ.get("RADAM_DIST_TASK", "local")
    def new_strategy():
        if args.strategy == "mirrored":
            return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        return tf.distribute.MultiWorkerMirroredStrategy()

    if args.strategy in ("mirrored", "mwms"):
        if args.strategy == "mwms":
            enable_multi_worker_fit()
        strategy = new_strategy()
    else:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        partitioner = None
        if args.partition:
            partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
                min_shard_bytes=16, max_shards=2
            )
        strategy = tf.distribute.experimental.ParameterServerStrategy(
            resolver, variable_partitioner=partitioner
        )
    results = {"num_replicas": strategy.num_replicas_in_sync, "cases": {}, "strategies": 1}
    for kind in args.optimizers.split(","):
        reference, sparse = single_device(kind, data)
        for mode in args.modes.split(","):
          for variant in args.variants.split(",") if mode == "loop" else ["plain"]:
            extra = {}
            if args.strategy == "pss":
                trajectory, extra = parameter_server_loop(strategy, kind, data)
            elif mode == "loop":
                if args.fresh_strategy and results["cases"]:
                    if args.strategy == "mwms" and task == "worker:0":
                        # A strategy only one worker makes (a chief-only evaluation, say) must
                        # not shift the collective keys of the MWMS objects made after it.
                        tf.distribute.MirroredStrategy(["/cpu:0"])
                    strategy = new_strategy()
                    results["strategies"] += 1
                trajectory, extra = replicated_loop(strategy, kind, data, variant)
            else:
                trajectory = replicated_fit(strategy, kind, data)
            name = f"{mode}-{kind}" if variant == "plain" else f"{mode}-{kind}-{variant}"
            results["cases"][name] = dict(
                reference=reference, distributed=trajectory, sparse_gradients=sparse, **extra
            )
            logging.info("%s %s done", task, name)
    if task in ("local", "worker:0", "chief:0"):
        with open(args.out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
