"""One phase of the ZeRO-1 checkpoint test: restore (optional), train some steps with
``shard_optimizer_state=True`` under MirroredStrategy over N logical CPUs, save.

tests/test_distribute_zero.py runs steps 1-4 with 4 replicas, 5-7 with 1, 8-10 with 2 (one
process per phase: in-process collectives cannot change group size) and checks that the
10 steps are the one-device trajectory.

    python zero_checkpoint.py --replicas 4 --first 0 --last 4 --save DIR/a --out a.json
    python zero_checkpoint.py --replicas 1 --first 4 --last 7 --restore A_CHECKPOINT ...
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--replicas", type=int, required=True)
parser.add_argument("--first", type=int, required=True, help="0-based first step")
parser.add_argument("--last", type=int, required=True, help="0-based end (exclusive)")
parser.add_argument("--restore", default=None)
parser.add_argument("--save", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--kind", default="radam", choices=["radam", "ranger"])
args = parser.parse_args()

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trajectory as t  # noqa: E402

from radam_dist.distribute import zero  # noqa: E402


def main():
    data = t.make_data()
    ids, feats, y = data
    n = args.replicas
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
    with strategy.scope():
        model = t.build_model()
        optimizer = t.make_optimizer(args.kind, "zero")
        optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    if args.restore:
        checkpoint.restore(args.restore).assert_existing_objects_matched()
    assert int(optimizer.iterations.numpy()) == args.first
    per_replica = t.GLOBAL_BATCH // n

    train_step = t.distributed_step(strategy, model, optimizer)

    trajectory = []
    for k in range(args.first, args.last):
        def value_fn(ctx, k=k):
            start = k * t.GLOBAL_BATCH + ctx.replica_id_in_sync_group * per_replica
            sl = slice(start, start + per_replica)
            return tf.constant(ids[sl]), tf.constant(feats[sl]), tf.constant(y[sl])

        train_step(*strategy.experimental_distribute_values_from_function(value_fn))
        trajectory.append(t.flat_weights(model))
    path = checkpoint.save(args.save)
    result = {"trajectory": trajectory, "checkpoint": path,
              "state_bytes_per_replica": zero.state_bytes_per_replica(optimizer)}
    if args.first == 0:
        result["reference"], result["sparse_gradients"] = t.single_device(args.kind, data)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
