#!/usr/bin/env python
"""Step time of radam_dist.horovod.DistributedOptimizer against a hand-written Horovod loop.

Anchor ("hand"): the loop Horovod's docs teach, written by hand for Keras 3:
tape -> ``hvd.grouped_allreduce(grads, op=hvd.Average)`` -> ``RectifiedAdam.apply_gradients``.
Candidate ("wrapper"): the same step through ``DistributedOptimizer(RectifiedAdam)``.
Also timed: "local" (no communication at all: the floor) and, with --compression, the
wrapper with fp16 / bf16 gradients. Every variant is a separate model + optimizer, each step
a tf.function; rounds interleave the variants so machine noise hits them alike.

Run it plainly: it starts ``horovodrun --gloo -np NP -H localhost:NP`` on itself, and
rank 0 prints medians (ms per step) and ratios against the anchor.

    .venv/bin/python bench/horovod_overhead.py            # 2 ranks, ~1.6 M parameters
    .venv/bin/python bench/horovod_overhead.py --compression --json out/bench_horovod.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time DistributedOptimizer against a hand-written hvd.grouped_allreduce loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--np", type=int, default=2, help="ranks on localhost")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the 3-layer MLP")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=11, help="timed rounds per variant")
    p.add_argument("--compression", action="store_true", help="also time fp16 and bf16")
    p.add_argument("--threads", type=int, default=1, help="TF threads per rank")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def launch(args, argv) -> int:
    horovodrun = Path(sys.executable).parent / "horovodrun"
    cmd = [
        str(horovodrun), "--gloo", "-np", str(args.np), "-H", f"localhost:{args.np}",
        sys.executable, os.path.abspath(__file__), "--worker", *argv,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.call(cmd, env=env)


def worker(args) -> None:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import horovod.tensorflow as hvd
    import keras

    from radam_dist import RectifiedAdam
    from radam_dist.horovod import DistributedOptimizer, broadcast_state

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    rng = np.random.default_rng(rank)
    x = tf.constant(rng.normal(size=(args.batch, 256)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=(args.batch,)).astype("int32"))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_model():
        return keras.Sequential(
            [
                keras.Input((256,)),
                keras.layers.Dense(args.width, activation="relu"),
                keras.layers.Dense(args.width, activation="relu"),
                keras.layers.Dense(10),
            ]
        )

    def make_step(kind: str):
        model = make_model()
        radam = RectifiedAdam(1e-3)
        if kind.startswith("wrapper"):
            compression = {"wrapper": None, "wrapper_fp16": "fp16", "wrapper_bf16": "bf16"}[kind]
            optimizer = DistributedOptimizer(radam, compression=compression)
        else:
            optimizer = radam
        broadcast_state(model, optimizer)
        variables = model.trainable_variables

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, variables)
            if kind == "hand":
                grads = hvd.grouped_allreduce(grads, op=hvd.Average)
            optimizer.apply_gradients(zip(grads, variables))
            return loss

        return step, sum(int(np.prod(v.shape)) for v in variables)

    kinds = ["local", "hand", "wrapper"]
    if args.compression:
        kinds += ["wrapper_fp16", "wrapper_bf16"]
    steps = {}
    params = 0
    for kind in kinds:
        steps[kind], params = make_step(kind)
        for _ in range(3):  # trace and warm up
            steps[kind]().numpy()

    def barrier():
        hvd.allreduce(tf.constant(0.0), name="bench.barrier").numpy()

    times = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for kind in order:
            barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = steps[kind]()
            loss.numpy()
            elapsed = time.perf_counter() - start
            # the slowest rank's time is the step time of the job
            slowest = hvd.allreduce(tf.constant(elapsed), op=hvd.Max, name="bench.time").numpy()
            times[kind].append(1000.0 * float(slowest) / args.steps)
    if rank != 0:
        return
    med = {k: statistics.median(v) for k, v in times.items()}
    # Same-round ratios cancel slow drifts of a shared machine better than ratios of medians.
    paired = {k: statistics.median(a / b for a, b in zip(times[k], times["hand"])) for k in kinds}
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; "
          f"{size} ranks on localhost (Gloo), {args.threads} TF thread(s) per rank")
    print(f"model: MLP 256-{args.width}-{args.width}-10 ({params / 1e6:.2f} M params, "
          f"{params * 4 / 2**20:.1f} MiB of float32 gradients), batch {args.batch}/rank, "
          f"{args.rounds} rounds x {args.steps} steps, RectifiedAdam")
    print(f"{'variant':<14}{'median ms/step':>16}{'min':>9}{'max':>9}{'vs hand':>10}"
          f"{'paired':>9}")
    for k in kinds:
        print(f"{k:<14}{med[k]:>16.2f}{min(times[k]):>9.2f}{max(times[k]):>9.2f}"
              f"{med[k] / med['hand']:>10.3f}{paired[k]:>9.3f}")
    print(f"wrapper vs hand-written loop: {100 * (med['wrapper'] / med['hand'] - 1):+.1f} % "
          f"(ratio of medians), {100 * (paired['wrapper'] - 1):+.1f} % (median same-round ratio)"
          f"; communication cost (hand vs local): {med['hand'] - med['local']:+.2f} ms/step")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"machine": cpu_model(), "ranks": size, "params": params, "ms_per_step": times,
                 "median": med, "paired_ratio_vs_hand": paired},
                indent=2,
            )
        )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return launch(args, [a for a in argv if a != "--worker"])


if __name__ == "__main__":
    raise SystemExit(main())
