#!/usr/bin/env python
"""Elastic training with RectifiedAdam: workers may die or join; training goes on.

Launch with ``run_elastic.sh`` (horovodrun --min-np/--max-np --host-discovery-script):

    HOSTS_FILE=hosts.txt MIN_NP=1 MAX_NP=4 deploy/horovod/run_elastic.sh --epochs 20

What makes it elastic (radam_dist.horovod.elastic):

* ``KerasState(model, epoch=0)`` holds the model and the whole optimizer state;
  ``CommitState`` commits it at the end of every epoch;
* ``elastic.run`` restarts ``train`` after a failure (from the last commit, rank 0's state
  copied to every worker, newcomers included) or after hosts were added/removed;
* the data is sharded *inside* ``train``, from the current ``hvd.rank()`` / ``hvd.size()``;
  the global batch stays ``--global-batch`` whatever the number of workers, so the learning
  rate needs no rescaling when the job shrinks or grows.
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402

from radam_dist import Lookahead, RectifiedAdam  # noqa: E402
from radam_dist.horovod import DistributedOptimizer, MetricAverage, elastic  # noqa: E402

from example_problem import make_dataset, make_model  # noqa: E402  (next to this file)

log = logging.getLogger("train_elastic")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Elastic Horovod training with RectifiedAdam (run with run_elastic.sh).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=128,
                   help="samples per step over all workers (a multiple of every size used)")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lookahead", action="store_true", help="wrap RAdam in Lookahead")
    p.add_argument("--seed", type=int, default=0, help="data and initial weights")
    return p.parse_args(argv)


def shard(x, y, global_batch: int, rank: int, size: int):
    """Rank ``rank``'s slice of every global batch, in order (the same global batches for
    any size that divides ``global_batch``)."""
    if global_batch % size:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of {size} workers")
    steps = len(x) // global_batch
    per = global_batch // size

    def pick(a):
        batches = a[: steps * global_batch].reshape(steps, global_batch, *a.shape[1:])
        return batches[:, rank * per:(rank + 1) * per].reshape(steps * per, *a.shape[1:])

    return pick(x), pick(y), per


def main(argv=None) -> int:
    args = parse_args(argv)
    hvd.init()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    keras.utils.set_random_seed(args.seed)
    x, y = make_dataset(args.samples, args.seed)
    model = make_model(hidden=(128,))
    radam = RectifiedAdam(args.lr)
    model.compile(
        optimizer=DistributedOptimizer(Lookahead(radam) if args.lookahead else radam),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=False,
    )
    model.build((None, 32))
    state = elastic.KerasState(model, epoch=0)

    @elastic.run
    def train(state):
        rank, size = hvd.rank(), hvd.size()
        xs, ys, per = shard(x, y, args.global_batch, rank, size)
        if rank == 0:
            log.info("training epochs %d..%d with %d workers", state.epoch, args.epochs - 1, size)
        model.fit(xs, ys, batch_size=per, epochs=args.epochs, initial_epoch=state.epoch,
                  shuffle=False, verbose=2 if rank == 0 else 0,
                  callbacks=[MetricAverage(), elastic.CommitState(state)])

    train(state)
    if hvd.rank() == 0:
        log.info("done: %d epochs, %d steps, %d restores", state.epoch,
                 int(model.optimizer.iterations.numpy()), state.restores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
