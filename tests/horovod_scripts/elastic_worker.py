"""One worker of the elastic Horovod tests (started by ``horovodrun`` in elastic mode).

Trains with ``radam_dist.horovod.elastic``: a custom loop (``loop``) or ``model.fit``
(``fit``). Global batch k is the same for any number of workers; worker r of n takes rows
[r * G / n, (r + 1) * G / n), and the gradients are averaged, so every step is a step on the
global batch whatever the size: the result must equal one process trained on the global
batches (``reference``), whichever workers died or joined on the way.

Events (JSON lines, one file per process, wall-clock ``t``) let the test check the path and
time the recoveries: start, step/epoch (with the size), reset, kill, grow, done.

  --kill-at N   the worker with rank 1 SIGKILLs itself when it reaches step N (loop) or
                batch N counted over the whole run (fit), once, in its first life.
  --grow-at N   rank 0 appends --add-host to --hosts-file (what the discovery script
                prints) at step / global batch N, then waits until Horovod notices.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402

from radam_dist import Lookahead, RectifiedAdam  # noqa: E402
from radam_dist.horovod import DistributedOptimizer, elastic, unwrap  # noqa: E402

G, FEATURES = 8, 6
LR = 0.01


class Events:
    def __init__(self, out: str):
        self.path = os.path.join(out, f"events.{os.getpid()}.jsonl")

    def __call__(self, event: str, **fields) -> None:
        fields.update(event=event, t=time.time(), pid=os.getpid(),
                      rank=hvd.rank() if hvd.is_initialized() else -1,
                      size=hvd.size() if hvd.is_initialized() else -1,
                      generation=elastic.generation())
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def global_batches(count: int):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(count, G, FEATURES)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(FEATURES, 1))) + 0.1 * rng.normal(size=(count, G, 1)))
    return x, y.astype("float32")


def shard(a, rank: int, size: int):
    per = G // size
    return a[:, rank * per:(rank + 1) * per]


def make_model(seed: int) -> keras.Model:
    init = lambda k: keras.initializers.GlorotUniform(seed=seed * 10 + k)  # noqa: E731
    return keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(16, activation="tanh", kernel_initializer=init(1)),
        keras.layers.Dense(1, kernel_initializer=init(2)),
    ])


def make_optimizer(kind: str):
    radam = RectifiedAdam(LR, amsgrad=True, weight_decay=1e-3, total_steps=40,
                          warmup_proportion=0.1)
    return Lookahead(radam, sync_period=3) if kind == "lookahead" else radam


def state_arrays(model, optimizer) -> dict:
    arrays = {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
    for i, v in enumerate(unwrap(optimizer).variables):
        arrays[f"o{i}"] = keras.ops.convert_to_numpy(v)
    arrays["iterations"] = keras.ops.convert_to_numpy(optimizer.iterations)
    return arrays


class Scenario:
    """What the test asked for: where to die, where to grow."""

    def __init__(self, args, events: Events):
        self.args, self.events = args, events
        self.killed = self.grown = False

    def maybe_die(self, position: int) -> None:
        if (self.args.kill_at is not None and position == self.args.kill_at
                and hvd.rank() == 1 and elastic.generation() == 0):
            self.events("kill", position=position)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_grow(self, position: int, state) -> None:
        if (self.args.grow_at is None or self.grown or position < self.args.grow_at
                or hvd.rank() != 0 or hvd.size() > 1):
            return
        with open(self.args.hosts_file, "a") as f:
            f.write(self.args.add_host + "\n")
        self.events("grow", position=position)
        self.grown = True
        deadline = time.monotonic() + 120
        while state._host_messages.empty() and time.monotonic() < deadline:
            time.sleep(0.1)  # until the driver's discovery notices (the next commit raises)


def run_loop(args, events: Events) -> None:
    x, y = global_batches(args.steps)
    model = make_model(seed=hvd.rank() + 1)  # ranks and newcomers start apart on purpose
    optimizer = DistributedOptimizer(make_optimizer(args.optimizer))
    state = elastic.KerasState(model, optimizer, step=0)
    state.register_reset_callbacks([lambda: events("reset", step=state.step)])
    scenario = Scenario(args, events)

    # A fixed signature (batch size unknown), as tf.data pipelines give: a new size does not
    # change the input shapes, so only elastic.function's re-trace after the reset brings in
    # the all-reduce when the job grows from 1 worker to 2.
    @elastic.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32),
                                       tf.TensorSpec([None, 1], tf.float32)])
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @elastic.run
    def train(state):
        events("enter", step=state.step, restores=state.restores)
        xs, ys = shard(x, hvd.rank(), hvd.size()), shard(y, hvd.rank(), hvd.size())
        while state.step < args.steps:
            scenario.maybe_die(state.step)
            train_step(xs[state.step], ys[state.step])
            events("step", step=state.step)
            state.step += 1
            scenario.maybe_grow(state.step, state)
            if state.step % args.commit_every == 0:
                state.commit()

    train(state)
    finish(args, events, model, optimizer, state)


class FitEvents(keras.callbacks.Callback):
    def __init__(self, events: Events, scenario: Scenario, state, batches: int):
        super().__init__()
        self.events, self.scenario, self.state, self.batches = events, scenario, state, batches
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.events("epoch", epoch=epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self.scenario.maybe_die(self.epoch * self.batches + batch)

    def on_epoch_end(self, epoch, logs=None):  # before CommitState: the commit notices
        self.scenario.maybe_grow((epoch + 1) * self.batches, self.state)


def run_fit(args, events: Events) -> None:
    batches = args.batches
    x, y = global_batches(batches)
    model = make_model(seed=hvd.rank() + 1)
    model.compile(optimizer=DistributedOptimizer(make_optimizer(args.optimizer)), loss="mse",
                  jit_compile=False)
    model.build((None, FEATURES))
    state = elastic.KerasState(model, epoch=0)
    state.register_reset_callbacks([lambda: events("reset", epoch=state.epoch)])
    scenario = Scenario(args, events)

    @elastic.run
    def train(state):
        events("enter", epoch=state.epoch, restores=state.restores)
        size = hvd.size()
        xs = shard(x, hvd.rank(), size).reshape(-1, FEATURES)
        ys = shard(y, hvd.rank(), size).reshape(-1, 1)
        # tf.data batches have an unknown batch size, so Keras' traced train function would
        # serve every size: only KerasState.reset (dropping it) brings in the all-reduce
        # when the job grows from 1 worker to 2.
        data = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(G // size)
        model.fit(data, epochs=args.epochs, initial_epoch=state.epoch, verbose=0,
                  callbacks=[FitEvents(events, scenario, state, batches),
                             elastic.CommitState(state)])

    train(state)
    finish(args, events, model, model.optimizer, state)


def finish(args, events, model, optimizer, state) -> None:
    rank = hvd.rank()
    arrays = state_arrays(model, optimizer)
    np.savez(os.path.join(args.out, f"final.rank{rank}.npz"), **arrays)
    events("done", step=getattr(state, "step", None), epoch=getattr(state, "epoch", None),
           restores=state.restores, syncs=state.syncs)
    if rank == 0:  # one process, no Horovod collectives, the global batches
        np.savez(os.path.join(args.out, "reference.npz"), **reference(args))


def reference(args) -> dict:
    model = make_model(seed=1)
    optimizer = make_optimizer(args.optimizer)
    if args.mode == "loop":
        x, y = global_batches(args.steps)

        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        for s in range(args.steps):
            step(x[s], y[s])
    else:
        x, y = global_batches(args.batches)
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
        model.fit(x.reshape(-1, FEATURES), y.reshape(-1, 1), batch_size=G, epochs=args.epochs,
                  shuffle=False, verbose=0)
    return state_arrays(model, optimizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["loop", "fit"])
    p.add_argument("--out", required=True)
    p.add_argument("--optimizer", choices=["radam", "lookahead"], default="lookahead")
    p.add_argument("--steps", type=int, default=30, help="loop: steps in total")
    p.add_argument("--commit-every", type=int, default=5, help="loop: steps per commit")
    p.add_argument("--epochs", type=int, default=6, help="fit: epochs")
    p.add_argument("--batches", type=int, default=3, help="fit: global batches per epoch")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--grow-at", type=int)
    p.add_argument("--hosts-file")
    p.add_argument("--add-host", default="")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    hvd.init()
    events = Events(args.out)
    events("start")
    (run_loop if args.mode == "loop" else run_fit)(args, events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
