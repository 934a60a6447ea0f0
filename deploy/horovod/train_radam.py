#!/usr/bin/env python
"""Train a Keras 3 model with RectifiedAdam (optionally inside Lookahead) under Horovod.

Copy this file and replace ``make_dataset`` / ``make_model`` (example_problem.py, shared with
train_elastic.py) with your own. Run it with
one process per device, e.g. ``horovodrun --gloo -np 2 -H localhost:2 python train_radam.py``
(see run_local.sh, run_hostfile.sh, run_mpirun.sh). What makes it correct under Horovod:

* every rank reads a different shard of the data (``shard(rank, size)``);
* ``DistributedOptimizer`` averages the gradients across ranks before each update;
* ``standard_callbacks`` broadcasts rank 0's model and optimizer state before the first
  step, scales the learning rate by the number of ranks (with warmup), averages the epoch
  metrics across ranks, and writes checkpoints and the CSV log on rank 0 only;
* on restart, every rank resumes from the newest checkpoint (a shared folder), with any
  number of ranks.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from radam_dist import Lookahead, RectifiedAdam  # noqa: E402
from radam_dist.horovod import DistributedOptimizer, standard_callbacks  # noqa: E402

from example_problem import make_dataset, make_model  # noqa: E402  (next to this file)

log = logging.getLogger("train_radam")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a small classifier with RectifiedAdam under Horovod.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=5, help="epochs in total (resume included)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
    p.add_argument("--samples", type=int, default=4096, help="training samples (all ranks)")
    p.add_argument("--lr", type=float, default=1e-3, help="single-process learning rate")
    p.add_argument(
        "--warmup-epochs", type=float, default=1.0,
        help="epochs to ramp the rate from --lr to --lr * ranks",
    )
    p.add_argument("--lookahead", action="store_true", help="wrap RAdam in Lookahead (Ranger)")
    p.add_argument(
        "--compression", choices=["none", "fp16", "bf16"], default="none",
        help="dtype the gradients travel in",
    )
    p.add_argument("--checkpoint-dir", default="checkpoints", help="rank 0 writes here")
    p.add_argument("--out", default=None, help="write summary.json (and rank digests) here")
    p.add_argument("--threads", type=int, default=0, help="TF threads per rank (0: TF decides)")
    p.add_argument(
        "--seed", type=int, default=None,
        help="seed Python, NumPy and Keras (the initial weights): two launches with the same "
             "seed, ranks and options train the same weights (Gloo or MPI alike)",
    )
    return p.parse_args(argv)


def shard(arrays, rank: int, size: int):
    """Rank ``rank``'s interleaved share: rows rank, rank + size, rank + 2 * size, ..."""
    return [a[rank::size] for a in arrays]


def latest_checkpoint(folder: str):
    """(path, epoch) of the newest ``epoch-NNN.keras`` in ``folder``, or (None, 0)."""
    found = []
    for path in glob.glob(os.path.join(folder, "epoch-*.keras")):
        match = re.search(r"epoch-(\d+)\.keras$", path)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None, 0
    epoch, path = max(found)
    return path, epoch


def digest(model: keras.Model) -> str:
    """A short hash of the weights: equal on every rank when they are in sync."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(message)s",
    )
    if args.seed is not None:
        # The same seed on every rank; the broadcast makes rank 0's initial weights win anyway.
        keras.utils.set_random_seed(args.seed)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    x, y = shard(make_dataset(args.samples), rank, size)
    steps_per_epoch = len(x) // args.batch_size

    checkpoint, initial_epoch = latest_checkpoint(args.checkpoint_dir)
    if checkpoint:
        # Every rank loads it (the folder is shared); BroadcastState makes sure they agree.
        model = keras.models.load_model(checkpoint)
        log.info("resuming from %s (epoch %d) with %d ranks", checkpoint, initial_epoch, size)
    else:
        model = make_model()
        radam = RectifiedAdam(args.lr)  # the rate is set per batch by the warmup callback
        inner = Lookahead(radam) if args.lookahead else radam
        compression = None if args.compression == "none" else args.compression
        model.compile(
            optimizer=DistributedOptimizer(inner, compression=compression),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=False,  # Horovod's ops cannot run inside XLA
        )
    if rank == 0:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    callbacks = standard_callbacks(
        [
            keras.callbacks.ModelCheckpoint(
                os.path.join(args.checkpoint_dir, "epoch-{epoch:03d}.keras")
            ),
            keras.callbacks.CSVLogger(
                os.path.join(args.checkpoint_dir, "training.csv"), append=bool(checkpoint)
            ),
        ],
        base_lr=args.lr,
        warmup_steps=int(args.warmup_epochs * steps_per_epoch),
    )
    start = time.monotonic()
    history = model.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=2 if rank == 0 else 0,
    )
    seconds = time.monotonic() - start
    weights = digest(model)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"digest.rank{rank}"), "w") as f:
            f.write(weights)
        if rank == 0:
            summary = {
                "ranks": size,
                "controller": "mpi" if hvd.mpi_enabled() else "gloo",
                "seed": args.seed,
                "epochs": args.epochs,
                "initial_epoch": initial_epoch,
                "steps": int(model.optimizer.iterations.numpy()),
                "loss": history.history.get("loss", []),
                "accuracy": history.history.get("accuracy", []),
                "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
                "fit_seconds": seconds,
                "weights_digest": weights,
            }
            with open(os.path.join(args.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
    log.info("done: %d steps in %.1f s, weights digest %s", model.optimizer.iterations.numpy(),
             seconds, weights)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
