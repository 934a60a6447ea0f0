"""One parameter-server worker (PSClient, no TensorFlow) for tests/test_netns.py and
bench/shaped_links.py: registers, then pushes --steps deterministic gradients in sync mode.

Gradients depend only on (worker, step), so the test can compute what the servers must hold.
Writes ``<steps done>`` to --progress after each push, and to --out the version every push
returned, the push times, and (--pull-final) the final parameters as lists and each shard's step and
version (Stats).
"""

import argparse
import json
import os
import time

import numpy as np

from radam_dist.ps.client import PSClient

SHAPES = {"dense/kernel": (128, 64), "emb": (1024, 64)}
SPLIT_BYTES = 1 << 16  # emb (256 KiB) is split by rows over the shards, the kernel is whole
OPTIMIZER = {"learning_rate": 0.01, "weight_decay": 0.001}


def initial_values(shapes=SHAPES):
    rng = np.random.default_rng(0)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}


def gradient(worker, step, shapes=SHAPES):
    rng = np.random.default_rng(1000 * worker + step)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", required=True, help="comma list, shard order")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=0, help="emb rows (default: SHAPES)")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds of 'compute' per step")
    parser.add_argument("--pull-final", action="store_true")
    args = parser.parse_args()

    shapes = dict(SHAPES)
    if args.rows:
        shapes["emb"] = (args.rows, 64)
    client = PSClient(args.targets.split(","), worker_id=f"worker-{args.worker}",
                      split_threshold_bytes=SPLIT_BYTES, retry_timeout=120.0)
    versions = [client.register(initial_values(shapes), OPTIMIZER)]
    times = []
    for step in range(args.steps):
        if args.pace:
            time.sleep(args.pace)
        grads = gradient(args.worker, step, shapes)
        start = time.perf_counter()
        versions.append(client.push(grads))
        times.append(time.perf_counter() - start)
        tmp = args.progress + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(step + 1))
        os.replace(tmp, args.progress)
    result = {"versions": versions, "times": times}
    if args.pull_final:
        result["final"] = {n: v.tolist() for n, v in client.pull().items()}
        result["stats"] = [{k: s[k] for k in ("step", "version", "shard_index")}
                           for s in client.stats()]
    client.close()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
