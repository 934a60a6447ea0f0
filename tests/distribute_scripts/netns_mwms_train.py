"""A 2-worker MWMS custom loop for tests/test_netns.py and bench/shaped_links.py.

Each step all-reduces a gradient of --params float32 values and applies RectifiedAdam; worker 0
writes ``<restart> <steps done>`` to --progress after every step. The loop ends after
--max-steps, or at the step where worker 0 sees --stop-file (the decision is all-reduced, so
both workers stop at the same step). --collective-timeout bounds how long one collective may
wait for a peer (a lost link turns into an error instead of a hang). Worker 0 writes the step
times to --out.
"""

import argparse
import json
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--params", type=int, default=1 << 20)
parser.add_argument("--max-steps", type=int, default=1000)
parser.add_argument("--progress", required=True)
parser.add_argument("--stop-file", default="")
parser.add_argument("--collective-timeout", type=float, default=20.0)
parser.add_argument("--out", default="")
args = parser.parse_args()

import tensorflow as tf  # noqa: E402

import radam_dist  # noqa: E402
from radam_dist.distribute import current_task  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=args.collective_timeout))
index = current_task()["index"]
restart = os.environ.get("RADAM_DIST_RESTART", "0")

with strategy.scope():
    var = tf.Variable(tf.zeros([args.params]), name="w")
    optimizer = radam_dist.RectifiedAdam(learning_rate=1e-3)
    optimizer.build([var])


@tf.function
def step(flag):
    def replica_fn(flag):
        ctx = tf.distribute.get_replica_context()
        scale = 0.01 * tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)
        optimizer.apply_gradients([(tf.fill([args.params], scale), var)])
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(flag))

    return strategy.run(replica_fn, args=(flag,))


def write_progress(done):
    tmp = args.progress + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{restart} {done}")
    os.replace(tmp, args.progress)


times = []
done = 0
for k in range(args.max_steps):
    flag = 1.0 if index == 0 and args.stop_file and os.path.exists(args.stop_file) else 0.0
    start = time.perf_counter()
    stop = strategy.experimental_local_results(step(tf.constant(flag)))[0]
    stop = float(stop)
    times.append(time.perf_counter() - start)
    done = k + 1
    if index == 0:
        write_progress(done)
    if stop > 0:
        break
print(f"worker {index} attempt {restart}: {done} steps, median step "
      f"{sorted(times)[len(times) // 2] * 1e3:.1f} ms", flush=True)
if index == 0 and args.out:
    with open(args.out, "w") as f:
        json.dump({"restart": int(restart), "steps": done, "times": times,
                   "iterations": int(optimizer.iterations.numpy())}, f)
