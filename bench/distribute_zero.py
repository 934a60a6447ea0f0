"""Benchmark: replica-sharded optimizer state (ZeRO-1) against unsharded RectifiedAdam.

For N = 1, 2, 4 replicas (MirroredStrategy over N logical CPU devices of this machine), in
one process per N, three configurations of the same model stepped in turn (A, B, C, A, B,
C, ...; each ratio is the median of the per-round ratios, so load that drifts over the run
hits all three alike):
  * ``unsharded``: shard_optimizer_state=False, the anchor (the replicated step, whatever
    path it takes now; the header says which);
  * ``all-reduce+slice``: ZeRO-1 with Keras' all-reduce, a slice, an all-gather (the
    fallback where the whole sum is needed; forced here with RADAM_DIST_ZERO_EXCHANGE=all-reduce
    at trace time);
  * ``local-reduce-scatter``: ZeRO-1's default under single-worker MirroredStrategy, the
    reduce-scatter and all-gather done in the step's graph (StepPlan.zero_exchange says why:
    TensorFlow 2.21 has no CPU reduce-scatter collective);
  * ``all-to-all`` (--mwms only): ZeRO-1's default under MWMS, the dense gradients' row
    blocks by the CollectiveAllToAllV2 collective (a reduce-scatter's bytes), summed by the
    receiver, then the all-gather.
Measured or counted for each:
  * optimizer-state bytes held by one replica (m and v; exact, from the variables);
  * bytes one replica sends per step, by formula from the shapes and the algorithm
    (zero.bytes_sent_per_replica; the Embedding's sparse gradient with the batch's rows);
  * median wall time of one training step (custom loop, global batch fixed).

    .venv/bin/python bench/distribute_zero.py                # N = 1, 2, 4; 30 rounds
    .venv/bin/python bench/distribute_zero.py --quick        # N = 2, 4; 12 rounds, ~1 min
    .venv/bin/python bench/distribute_zero.py --quick --mwms # and MWMS over 2 processes
    .venv/bin/python bench/distribute_zero.py --replicas 2 --steps 10
    .venv/bin/python bench/distribute_zero.py --replicas '' --mwms --steps 25  # MWMS only

Logical devices share the machine's cores, so step times measure the work of each path
(N updates of the whole model unsharded, N of a shard sharded, plus the exchange), not a
speed-up from more hardware.
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


MODES = ("unsharded", "all-reduce+slice", "local-reduce-scatter")
MWMS_MODES = ("unsharded", "all-reduce+slice", "all-to-all")
IDS_PER_EXAMPLE = 8


def child(replicas: int, steps: int, mwms: bool = False) -> dict:
    import numpy as np
    import tensorflow as tf

    if not mwms:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    import keras

    import radam_dist
    from radam_dist import fused
    from radam_dist.distribute import zero

    if mwms:  # one replica per worker process (TF_CONFIG from radam-dist launch)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        replicas = strategy.num_replicas_in_sync
    else:
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    per_replica = BATCH // replicas
    # under MWMS the default exchange is all-to-all (choose_exchange); with one replica
    # there is nothing to exchange, and ZeRO takes its default path
    modes = MWMS_MODES if mwms else (MODES[0], MODES[2]) if replicas == 1 else MODES

    def make(mode):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            ids = keras.Input((IDS_PER_EXAMPLE,), dtype="int32")
            x = keras.layers.Flatten()(keras.layers.Embedding(VOCAB, DIM)(ids))
            x = keras.layers.Dense(HIDDEN, activation="relu")(x)
            x = keras.layers.Dense(HIDDEN, activation="relu")(x)
            model = keras.Model(ids, keras.layers.Dense(1)(x))
            optimizer = radam_dist.RectifiedAdam(
                1e-3, shard_optimizer_state=mode != "unsharded")
            optimizer.build(model.trainable_variables)

        def replica_step(r_ids, r_y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(r_ids, training=True) - r_y)) / BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        @tf.function
        def train_step(r_ids, r_y):
            strategy.run(replica_step, args=(r_ids, r_y))

        return model, optimizer, train_step

    rs = np.random.RandomState(0)

    def batch():
        ids_np = rs.randint(0, VOCAB, (BATCH, IDS_PER_EXAMPLE)).astype("int32")
        y_np = rs.randn(BATCH, 1).astype("float32")

        def value_fn(ctx):
            start = ctx.replica_id_in_sync_group * per_replica
            rows = slice(start, start + per_replica)
            return tf.constant(ids_np[rows]), tf.constant(y_np[rows])

        return strategy.experimental_distribute_values_from_function(value_fn)

    batches = [batch() for _ in range(steps + 3)]
    runs = {}
    for mode in modes:
        if mode == "all-reduce+slice":  # read when the step is traced
            os.environ[zero.EXCHANGE_ENV] = "all-reduce"
        model, optimizer, train_step = make(mode)
        for b in batches[:3]:  # trace and warm up
            train_step(*b)
        optimizer.iterations.numpy()
        os.environ.pop(zero.EXCHANGE_ENV, None)
        runs[mode] = (model, optimizer, train_step)
    times = {mode: [] for mode in modes}
    for b in batches[3:]:
        for mode in modes:
            _, optimizer, train_step = runs[mode]
            start = time.perf_counter()
            train_step(*b)
            optimizer.iterations.numpy()  # wait for the step
            times[mode].append(time.perf_counter() - start)
    anchor = np.array(times["unsharded"])
    params = sum(int(np.prod(v.shape)) for v in runs["unsharded"][0].trainable_variables)
    fused_here = runs["unsharded"][1].step_plan().switches.fused
    out = {"replicas": replicas, "params": params, "steps": steps,
           "strategy": "MWMS, 1 CPU per worker process" if mwms else
           f"MirroredStrategy over {replicas} logical CPUs",
           "replicated_path": ("fused chunks per device (StepPlan.mirrored_devices)" if fused_here
                               else "per-variable (extended.update)"), "modes": {}}
    for mode in modes:
        _, optimizer, _ = runs[mode]
        t = np.array(times[mode])
        row = {"state_bytes_per_replica": zero.state_bytes_per_replica(optimizer),
               "median_step_s": float(np.median(t)),
               "median_ratio": float(np.median(t / anchor))}
        if mode != "unsharded":
            row["exchange"] = zero.exchange_path(optimizer)
            # the Embedding's gradient: IDS_PER_EXAMPLE rows per example of a replica's batch
            row["bytes_sent"] = zero.bytes_sent_per_replica(
                optimizer, sparse_rows=per_replica * IDS_PER_EXAMPLE)
        out["modes"][mode] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,4",
                        help="comma list of N ('' with --mwms: MWMS only)")
    parser.add_argument("--steps", type=int, default=30,
                        help="timed rounds (one step of each configuration) per N")
    parser.add_argument("--quick", action="store_true", help="N = 2, 4; 12 rounds (~1 min)")
    parser.add_argument("--mwms", action="store_true",
                        help="also MultiWorkerMirroredStrategy over 2 worker processes "
                             "(radam-dist launch; unsharded, all-reduce+slice, all-to-all)")
    parser.add_argument("--mwms-workers", type=int, default=2, metavar="N",
                        help="worker processes of --mwms (default 2)")
    parser.add_argument("--child", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--child-mwms", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.child_mwms:
        result = child(0, args.steps, mwms=True)
        if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps)))
        return 0
    if args.quick:
        args.replicas, args.steps = "2,4", 12
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("RADAM_DIST_ZERO_EXCHANGE", None)
    results = []
    commands = [[sys.executable, __file__, "--child", str(n), "--steps", str(args.steps)]
                for n in [int(x) for x in args.replicas.split(",") if x.strip()]]
    if args.mwms:
        commands.append([sys.executable, "-m", "radam_dist.cli", "launch", "--workers",
                         str(args.mwms_workers),
                         "--", sys.executable, __file__, "--child-mwms", "--steps",
                         str(args.steps)])
    for command in commands:
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        n = command[command.index("--steps") - 1]
        if out.returncode:
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
            raise SystemExit(f"child N={n} failed ({out.returncode})")
        line = [l for l in out.stdout.splitlines() if "RESULT " in l][-1]
        results.append(json.loads(line[line.index("RESULT ") + len("RESULT "):]))
    first = results[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f} at the end; model: {first['params']:,} float32 "
          f"parameters (Embedding {VOCAB}x{DIM}, sparse gradient); global batch {BATCH}; "
          f"{args.steps} interleaved rounds; unsharded anchor: {first['replicated_path']}")
    print("| strategy, N | configuration (exchange) | state bytes/replica | bytes sent/replica/"
          "step (reduce + gather) | bytes vs unsharded | median step | median ratio to "
          "unsharded |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        n = res["replicas"]
        unsharded_bytes = next((m["bytes_sent"]["unsharded"] for m in res["modes"].values()
                                if "bytes_sent" in m), 0)
        for mode, row in res["modes"].items():
            if mode == "unsharded":
                sent, rel, name = f"{unsharded_bytes:,}", "1.00", "unsharded (all-reduce)"
            else:
                b = row["bytes_sent"]
                sent = f"{b['total']:,} ({b['reduce']:,} + {b['gather']:,})"
                rel = f"{b['total'] / unsharded_bytes:.2f}" if unsharded_bytes else "-"
                name = f"ZeRO-1 ({row['exchange']})"
            where = "MWMS" if res["strategy"].startswith("MWMS") else "Mirrored"
            print(f"| {where}, {n} | {name} | {row['state_bytes_per_replica']:,} | {sent} | "
                  f"{rel} | {row['median_step_s'] * 1e3:.1f} ms | {row['median_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
