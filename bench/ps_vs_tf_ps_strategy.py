"""Step time: radam_dist's parameter server vs TensorFlow's ParameterServerStrategy.

The same model (an MLP, --hidden sets its size), the same batch, the same RAdam math, one
parameter-server task and one worker on this machine, steps timed after a warm-up:

* radam-ps: `radam-ps serve` in its own process; this process is the worker: forward /
  backward in a tf.function, then PushPull (gradients up, RectifiedAdam on the server,
  parameters down) and assign.
* TF PSS: a `tf.distribute.Server` "ps" process holds the variables and the RAdam slots, a
  "worker" process runs the step, this process is the chief (ClusterCoordinator). The step
  applies radam_math (the same functions RectifiedAdam calls) to the PS variables.
  Reported twice: one step at a time (schedule + join each step, like radam-ps' synchronous
  round trip) and pipelined (schedule all, join once).

    .venv/bin/python bench/ps_vs_tf_ps_strategy.py [--hidden 1024] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

IN, OUT, BATCH = 512, 10, 64


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def shapes(hidden):
    return {"w1": (IN, hidden), "w2": (hidden, hidden), "w3": (hidden, OUT)}


def initial(hidden):
    import numpy as np

    rng = np.random.default_rng(0)
    return {k: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32) for k, s in shapes(hidden).items()}


def loss_fn(tf, params, x, y):
    h = tf.nn.relu(x @ params[0])
    h = tf.nn.relu(h @ params[1])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, h @ params[2]))


def batch(tf):
    x = tf.random.stateless_normal([BATCH, IN], seed=[1, 2])
    y = tf.random.stateless_uniform([BATCH], seed=[3, 4], maxval=OUT, dtype=tf.int32)
    return x, y


def bench_radam_ps(hidden, steps, workdir: Path):
    import tensorflow as tf

    from radam_dist.ps.client import PSClient

    port_file = workdir / "ps.port"
    proc = subprocess.Popen([sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0",
                             "--port-file", str(port_file), "--mode", "async", "--max-staleness", "-1",
                             "--checkpoint-interval", "0"], cwd=REPO, start_new_session=True,
                            stdout=open(workdir / "ps.log", "wb"), stderr=subprocess.STDOUT)
    try:
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError((workdir / "ps.log").read_text())
            time.sleep(0.05)
        client = PSClient([f"127.0.0.1:{int(port_file.read_text())}"], tune_allocator=True)
        names = sorted(shapes(hidden))
        client.register(initial(hidden), {"learning_rate": 1e-3})
        values = client.pull()
        params = [tf.Variable(values[n]) for n in names]
        x, y = batch(tf)

        @tf.function
        def grads():
            with tf.GradientTape() as tape:
                loss = loss_fn(tf, params, x, y)
            return loss, tape.gradient(loss, params)

        times = []
        for i in range(steps + 3):
            t = time.perf_counter()
            loss, g = grads()
            _, new = client.push_pull({n: gi.numpy() for n, gi in zip(names, g)})
            for n, p in zip(names, params):
                p.assign(new[n])
            if i >= 3:
                times.append(time.perf_counter() - t)
        return statistics.median(times), float(loss)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


TF_TASK = """
import os, sys, json, tensorflow as tf
spec = json.loads(sys.argv[1])
server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name=sys.argv[2], task_index=0,
                              protocol="grpc", start=True)
server.join()
"""


def bench_tf_pss(hidden, steps, workdir: Path):
    import tensorflow as tf

    from radam_dist import radam_math

    chief, worker, ps = free_ports(3)
    spec = {"chief": [f"127.0.0.1:{chief}"], "worker": [f"127.0.0.1:{worker}"], "ps": [f"127.0.0.1:{ps}"]}
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, "-c", TF_TASK, json.dumps(spec), job], env=env,
                              start_new_session=True, stdout=open(workdir / f"{job}.log", "wb"),
                              stderr=subprocess.STDOUT) for job in ("worker", "ps")]
    try:
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(spec), task_type="chief", task_id=0, rpc_layer="grpc")
        strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
        coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
        names = sorted(shapes(hidden))
        values = initial(hidden)
        with strategy.scope():
            params = [tf.Variable(values[n]) for n in names]
            m = [tf.Variable(tf.zeros_like(values[n])) for n in names]
            v = [tf.Variable(tf.zeros_like(values[n])) for n in names]
            step = tf.Variable(0, dtype=tf.int64)
        hp = radam_math.RAdamHyperparams()

        @tf.function
        def train_step():
            def replica():
                x, y = batch(tf)
                with tf.GradientTape() as tape:
                    loss = loss_fn(tf, params, x, y)
                g = tape.gradient(loss, params)
                s = radam_math.step_scalars(step + 1, 1e-3, 0.0, hp, tf.float32, has_weight_decay=False)
                for var, gi, mi, vi in zip(params, g, m, v):
                    radam_math.apply_dense(var, gi, mi, vi, None, s)
                step.assign_add(1)
                return loss

            return strategy.run(replica)

        for _ in range(3):  # warm-up
            coordinator.schedule(train_step)
        coordinator.join()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            result = coordinator.schedule(train_step)
            coordinator.join()
            times.append(time.perf_counter() - t)
        loss = float(result.fetch())
        t = time.perf_counter()
        for _ in range(steps):
            coordinator.schedule(train_step)
        coordinator.join()
        pipelined = (time.perf_counter() - t) / steps
        return statistics.median(times), pipelined, loss
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import tempfile

    n = sum(a * b for a, b in shapes(args.hidden).values())
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout
    print(f"machine: {os.cpu_count()} cores, {cpu.strip()}; model: MLP {IN}-{args.hidden}-{args.hidden}-{OUT}, "
          f"{n:,} parameters ({4 * n / 1e6:.1f} MB), batch {BATCH}, {args.steps} timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        ours, loss_ours = bench_radam_ps(args.hidden, args.steps, Path(tmp))
        tf_step, tf_pipelined, loss_tf = bench_tf_pss(args.hidden, args.steps, Path(tmp))
    print(f"radam-ps (PushPull per step)        : {1e3 * ours:8.1f} ms/step (median)   loss {loss_ours:.4f}")
    print(f"TF ParameterServerStrategy, stepwise: {1e3 * tf_step:8.1f} ms/step (median)   loss {loss_tf:.4f}")
    print(f"TF ParameterServerStrategy, pipelined: {1e3 * tf_pipelined:7.1f} ms/step (mean)")
    print(f"ratio radam-ps / TF stepwise: {ours / tf_step:.2f}; / TF pipelined: {ours / tf_pipelined:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
