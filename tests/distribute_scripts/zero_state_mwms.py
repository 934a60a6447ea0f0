"""ZeRO-1 state under MultiWorkerMirroredStrategy, seen whole: run by
tests/test_distribute_zero.py on two worker processes (``radam-dist launch --workers 2``).

Each worker trains trajectory.py's model 4 steps with ``shard_optimizer_state=True`` (each
worker holds half of every slot), then, on every worker as MWMS requires (the gathers are
collectives): ``get_weights()``, ``get_slot`` of every slot, and ``model.save`` (worker 0 to
``--keras``, the others to a scratch path). Worker 0 writes them to ``--out`` with the
one-device reference (its state after 4 steps and its 10-step trajectory); the test loads
the ``.keras`` file in a plain process and trains the remaining 6 steps.

    radam-dist launch --workers 2 -- python zero_state_mwms.py --kind ranger --out r.json \\
        --keras model.keras
"""

import argparse
import json
import os
import sys
import tempfile

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--kind", choices=["radam", "ranger"], default="ranger")
parser.add_argument("--out", required=True)
parser.add_argument("--keras", required=True)
args = parser.parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trajectory as t  # noqa: E402

SPLIT = 4


def main():
    data = t.make_data()
    ids, feats, y = data
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    n = strategy.num_replicas_in_sync
    with strategy.scope():
        model = t.build_model()
        optimizer = t.make_optimizer(args.kind, "zero")
        model.compile(optimizer=optimizer, loss="mse")
        optimizer.build(model.trainable_variables)
    per_replica = t.GLOBAL_BATCH // n

    train_step = t.distributed_step(strategy, model, optimizer)

    for k in range(SPLIT):
        def value_fn(ctx, k=k):
            start = k * t.GLOBAL_BATCH + ctx.replica_id_in_sync_group * per_replica
            sl = slice(start, start + per_replica)
            return tf.constant(ids[sl]), tf.constant(feats[sl]), tf.constant(y[sl])

        train_step(*strategy.experimental_distribute_values_from_function(value_fn))
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    weights = [w.tolist() for w in optimizer.get_weights()]
    slots = {name: [np.asarray(optimizer.get_slot(v, name)).tolist()
                    for v in model.trainable_variables] for name in optimizer.get_slot_names()}
    chief = strategy.cluster_resolver.task_id == 0
    path = args.keras if chief else os.path.join(tempfile.mkdtemp(), "model.keras")
    model.save(path)
    if not chief:
        return 0
    reference = t.build_model()
    ref_opt = t.make_optimizer(args.kind)
    trajectory = []
    for k in range(t.STEPS):
        sl = slice(k * t.GLOBAL_BATCH, (k + 1) * t.GLOBAL_BATCH)
        with tf.GradientTape() as tape:
            loss = t.loss_fn(reference, ids[sl], feats[sl], y[sl])
        ref_opt.apply_gradients(zip(tape.gradient(loss, reference.trainable_variables),
                                    reference.trainable_variables))
        trajectory.append(t.flat_weights(reference))
        if k + 1 == SPLIT:
            ref_weights = [w.tolist() for w in ref_opt.get_weights()]
            ref_slots = {name: [np.asarray(ref_opt.get_slot(v, name)).tolist()
                                for v in reference.trainable_variables]
                         for name in ref_opt.get_slot_names()}
    result = dict(num_replicas=n, layout=inner._state_layout.kind, weights=weights,
                  slots=slots, reference_weights=ref_weights, reference_slots=ref_slots,
                  trajectory=trajectory, names=optimizer.get_slot_names(),
                  reference_names=ref_opt.get_slot_names())
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
