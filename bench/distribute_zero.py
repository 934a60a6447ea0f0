"""Benchmark: replica-sharded optimizer state (ZeRO-1) against unsharded RectifiedAdam.

For N = 1, 2, 4 replicas (MirroredStrategy over N logical CPU devices of this machine), with
``shard_optimizer_state`` off (the anchor) and on, measures in the same run:
  * optimizer-state bytes held by one replica (m and v; exact, from the variables);
  * median wall time of one training step (custom loop, global batch fixed).
Prints a markdown table with the ratios sharded / unsharded. Each configuration runs in its
own process (logical devices are fixed at TensorFlow start-up).

    .venv/bin/python bench/distribute_zero.py                # N = 1, 2, 4; 30 timed steps
    .venv/bin/python bench/distribute_zero.py --replicas 2 --steps 10

Logical devices share the machine's cores, so step times measure the extra work of the
sharded path (slicing, all-gather), not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

VOCAB, DIM, HIDDEN, BATCH = 20000, 32, 512, 256


def child(replicas: int, sharded: bool, steps: int) -> dict:
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    import keras

    import radam_dist
    from radam_dist.distribute import zero

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    with strategy.scope():
        ids = keras.Input((8,), dtype="int32")
        x = keras.layers.Flatten()(keras.layers.Embedding(VOCAB, DIM)(ids))
        x = keras.layers.Dense(HIDDEN, activation="relu")(x)
        x = keras.layers.Dense(HIDDEN, activation="relu")(x)
        model = keras.Model(ids, keras.layers.Dense(1)(x))
        optimizer = radam_dist.RectifiedAdam(1e-3, shard_optimizer_state=sharded)
        optimizer.build(model.trainable_variables)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    rs = np.random.RandomState(0)
    per_replica = BATCH // replicas

    def replica_step(r_ids, r_y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(r_ids, training=True) - r_y)) / BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(r_ids, r_y):
        strategy.run(replica_step, args=(r_ids, r_y))

    def batch():
        ids_np = rs.randint(0, VOCAB, (BATCH, 8)).astype("int32")
        y_np = rs.randn(BATCH, 1).astype("float32")
        def value_fn(ctx):
            start = ctx.replica_id_in_sync_group * per_replica
            rows = slice(start, start + per_replica)
            return tf.constant(ids_np[rows]), tf.constant(y_np[rows])

        return strategy.experimental_distribute_values_from_function(value_fn)

    batches = [batch() for _ in range(steps + 3)]
    for b in batches[:3]:  # trace and warm up
        train_step(*b)
    optimizer.iterations.numpy()
    times = []
    for b in batches[3:]:
        start = time.perf_counter()
        train_step(*b)
        optimizer.iterations.numpy()  # wait for the step
        times.append(time.perf_counter() - start)
    return {"replicas": replicas, "sharded": sharded, "params": params,
            "state_bytes_per_replica": zero.state_bytes_per_replica(optimizer),
            "median_step_s": float(np.median(times)), "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,4", help="comma list of N")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--child", nargs=2, metavar=("N", "SHARDED"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(int(args.child[0]), args.child[1] == "1", args.steps)))
        return 0
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    rows = []
    for n in [int(x) for x in args.replicas.split(",")]:
        for sharded in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), str(int(sharded)),
                 "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
            rows.append(json.loads(line[len("RESULT "):]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"model: {rows[0]['params']} float32 parameters; global batch {BATCH}; "
          f"{args.steps} timed steps")
    print("| N | state bytes/replica, unsharded | sharded | ratio | median step unsharded | "
          "sharded | ratio |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["replicas"], r["sharded"]): r for r in rows}
    for n in sorted({r["replicas"] for r in rows}):
        a, b = by[(n, False)], by[(n, True)]
        print(f"| {n} | {a['state_bytes_per_replica']:,} | {b['state_bytes_per_replica']:,} | "
              f"{b['state_bytes_per_replica'] / a['state_bytes_per_replica']:.3f} | "
              f"{a['median_step_s'] * 1e3:.1f} ms | {b['median_step_s'] * 1e3:.1f} ms | "
              f"{b['median_step_s'] / a['median_step_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
