"""One rank of the Horovod tests (started by ``horovodrun --gloo``, or directly for -np 1).

Modes:
  main    every scenario of DistributedOptimizer (custom loop and model.fit); each rank
          saves its weights and optimizer state, rank 0 also a single-process reference
          trained on the concatenated global batches with the plain (unwrapped) optimizer.
  resume  load the rank-0 checkpoint written by ``main``'s fit scenario and train one more
          epoch (with whatever -np this job has), saving the result.
  die     train; rank 1 kills itself at step 3 (the test checks the job fails fast).

Data: global batch k holds GLOBAL_BATCH samples; rank r of n takes rows
[r * GLOBAL_BATCH / n, (r + 1) * GLOBAL_BATCH / n), so the ranks' batches concatenated in
rank order are the global batch, for any n dividing GLOBAL_BATCH.
"""

from __future__ import annotations

import argparse
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
from radam_dist.horovod import (  # noqa: E402
    DistributedOptimizer,
    LearningRateScaleWarmup,
    broadcast_state,
    standard_callbacks,
    unwrap,
)

GLOBAL_BATCH = 8
VOCAB, IDS, FEATURES = 12, 3, 5
STEPS = 7
FIT_EPOCHS, FIT_BATCHES = 2, 3  # main trains 2 epochs of 3 batches; resume adds a third
BASE_LR = 0.01


# -- data and model ---------------------------------------------------------------------------
def global_batches(count: int, seed: int):
    """``count`` global batches of (ids, features, targets), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(count, GLOBAL_BATCH, IDS)).astype("int32")
    feats = rng.normal(size=(count, GLOBAL_BATCH, FEATURES)).astype("float32")
    targets = (feats.sum(-1, keepdims=True) + rng.normal(size=(count, GLOBAL_BATCH, 1))).astype(
        "float32"
    )
    return ids, feats, targets


def shard(array, rank: int, size: int):
    per_rank = GLOBAL_BATCH // size
    return array[:, rank * per_rank:(rank + 1) * per_rank]


def make_model(seed: int) -> keras.Model:
    """An embedding (sparse gradients) and two dense layers; ``seed`` sets the init."""
    ids = keras.Input((IDS,), dtype="int32", name="ids")
    feats = keras.Input((FEATURES,), name="feats")
    init = lambda k: keras.initializers.GlorotUniform(seed=seed * 100 + k)  # noqa: E731
    emb = keras.layers.Embedding(VOCAB, 4, embeddings_initializer=init(1))(ids)
    x = keras.layers.Concatenate()([keras.layers.Flatten()(emb), feats])
    x = keras.layers.Dense(8, activation="tanh", kernel_initializer=init(2))(x)
    out = keras.layers.Dense(1, kernel_initializer=init(3))(x)
    return keras.Model([ids, feats], out)


def make_optimizer(kind: str):
    if kind == "sgd":
        return keras.optimizers.SGD(0.05, momentum=0.5)
    radam = RectifiedAdam(
        BASE_LR, amsgrad=True, weight_decay=1e-3, epsilon=1e-3, total_steps=20,
        warmup_proportion=0.2,
    )
    if kind == "lookahead":
        return Lookahead(radam, sync_period=3, slow_step_size=0.5)
    if kind == "loss_scale":  # mixed-precision style: the wrapper forwards scale_loss
        return keras.optimizers.LossScaleOptimizer(radam, initial_scale=2.0**10)
    return radam


# name -> (optimizer kind, DistributedOptimizer kwargs, backward passes per step)
SCENARIOS = {
    "radam": ("radam", {}, 1),
    "lookahead": ("lookahead", {}, 1),
    "sgd": ("sgd", {}, 1),
    "loss_scale": ("loss_scale", {}, 1),
    "sparse_as_dense": ("radam", {"sparse_as_dense": True}, 1),
    "bpps2": ("lookahead", {"backward_passes_per_step": 2}, 2),
    "fp16": ("radam", {"compression": "fp16"}, 1),
    "bf16": ("radam", {"compression": "bf16"}, 1),
}


def state_of(model, optimizer) -> dict:
    arrays = {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
    inner = unwrap(optimizer)
    for i, v in enumerate(inner.variables):
        arrays[f"o{i}"] = keras.ops.convert_to_numpy(v)
    arrays["iterations"] = keras.ops.convert_to_numpy(optimizer.iterations)
    return arrays


def mse(model, ids, feats, targets):
    pred = model([ids, feats], training=True)
    return tf.reduce_mean(tf.square(pred - targets))


# -- custom training loop ---------------------------------------------------------------------
def run_loop(name: str, rank: int, size: int, out: str, reference: bool = False) -> None:
    kind, kwargs, passes = SCENARIOS[name]
    ids, feats, targets = global_batches(STEPS * passes, seed=1)
    model = make_model(seed=0 if reference else rank)  # ranks start apart on purpose
    optimizer = make_optimizer(kind)
    if not reference:
        optimizer = DistributedOptimizer(optimizer, **kwargs)
        optimizer.build(model.trainable_variables)
        if rank != 0:  # garbage optimizer state: the broadcast must overwrite all of it
            for v in unwrap(optimizer).variables:
                v.assign(np.full(v.shape, 7, dtype=v.dtype))
        broadcast_state(model, optimizer, root_rank=0)

    @tf.function
    def step(i, f, t):
        with tf.GradientTape() as tape:
            loss = mse(model, i, f, t)
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        if reference and kwargs.get("sparse_as_dense"):
            # Dense embedding gradients mean dense RAdam updates (every row moves with its
            # momentum), so the reference must densify too.
            grads = [tf.convert_to_tensor(g) for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    if reference:
        # One step on the concatenation of every rank's micro-batches of that step.
        for s in range(STEPS):
            sl = slice(s * passes, (s + 1) * passes)
            step(*(np.concatenate(list(a[sl]), axis=0) for a in (ids, feats, targets)))
        np.savez(os.path.join(out, f"{name}.reference.npz"), **state_of(model, optimizer))
        return
    ids, feats, targets = (shard(a, rank, size) for a in (ids, feats, targets))
    for s in range(STEPS * passes):
        step(ids[s], feats[s], targets[s])
    np.savez(os.path.join(out, f"{name}.rank{rank}.npz"), **state_of(model, optimizer))


def run_mismatch(rank: int, out: str) -> None:
    """Rank 1 builds a different model: broadcast_state must refuse on every rank and leave
    every variable as it was."""
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(3 + rank)])
    optimizer = DistributedOptimizer(make_optimizer("radam"))
    optimizer.build(model.trainable_variables)
    before = [keras.ops.convert_to_numpy(v) for v in model.weights + optimizer.variables]
    try:
        broadcast_state(model, optimizer)
        message = ""
    except ValueError as exc:
        message = str(exc)
    after = [keras.ops.convert_to_numpy(v) for v in model.weights + optimizer.variables]
    unchanged = all(np.array_equal(a, b) for a, b in zip(before, after))
    np.savez(
        os.path.join(out, f"mismatch.rank{rank}.npz"),
        message=np.array(message), unchanged=np.array(unchanged),
    )


# -- model.fit --------------------------------------------------------------------------------
class RecordLearningRate(keras.callbacks.Callback):
    """Records the rate each step uses (after LearningRateScaleWarmup set it)."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def fit_data(rank: int, size: int):
    """This rank's share of FIT_BATCHES global batches, flat for model.fit (shuffle=False:
    every epoch sees the same batches in the same order)."""
    ids, feats, targets = global_batches(FIT_BATCHES, seed=2)
    ids, feats, targets = (shard(a, rank, size) for a in (ids, feats, targets))
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    return flat(ids), flat(feats), flat(targets), GLOBAL_BATCH // size


def compile_for_fit(model, optimizer):
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)


def run_fit(rank: int, size: int, out: str) -> None:
    ids, feats, targets, batch = fit_data(rank, size)
    model = make_model(seed=rank)
    compile_for_fit(model, DistributedOptimizer(make_optimizer("lookahead")))
    recorder = RecordLearningRate()
    callbacks = standard_callbacks(
        [
            keras.callbacks.ModelCheckpoint(os.path.join(out, "fit.epoch{epoch}.keras")),
            keras.callbacks.CSVLogger(os.path.join(out, f"fit.log.rank{rank}.csv")),
        ],
        base_lr=BASE_LR,
        warmup_steps=4,
    )
    history = model.fit(
        [ids, feats], targets, batch_size=batch, epochs=FIT_EPOCHS, shuffle=False,
        callbacks=callbacks + [recorder], verbose=0,
    )
    arrays = state_of(model, model.optimizer)
    arrays["loss"] = np.array(history.history["loss"])
    arrays["lr"] = np.array(recorder.rates)
    np.savez(os.path.join(out, f"fit.rank{rank}.npz"), **arrays)


def run_fit_reference(out: str, epochs: int) -> None:
    """Single process, global batch, plain optimizer, the same lr ramp (scale 2 = -np 2)."""
    ids, feats, targets, batch = fit_data(0, 1)
    model = make_model(seed=0)
    compile_for_fit(model, make_optimizer("lookahead"))
    history = model.fit(
        [ids, feats], targets, batch_size=batch, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[LearningRateScaleWarmup(BASE_LR, warmup_steps=4, scale=2.0)],
    )
    arrays = state_of(model, model.optimizer)
    arrays["loss"] = np.array(history.history["loss"])
    np.savez(os.path.join(out, f"fit.reference{epochs}.npz"), **arrays)


def run_resume(rank: int, size: int, out: str, checkpoint: str) -> None:
    """Continue the -np 2 run from its rank-0 checkpoint for one epoch with this job's -np."""
    epochs = FIT_EPOCHS + 1
    ids, feats, targets, batch = fit_data(rank, size)
    model = keras.models.load_model(checkpoint)  # DistributedOptimizer comes back with it
    assert isinstance(model.optimizer, DistributedOptimizer), type(model.optimizer)
    resumed_at = int(model.optimizer.iterations.numpy())
    # The global batch is unchanged (each rank's share grew), so keep the lr scale of -np 2.
    callbacks = standard_callbacks()
    callbacks.insert(1, LearningRateScaleWarmup(BASE_LR, warmup_steps=4, scale=2.0))
    model.fit(
        [ids, feats], targets, batch_size=batch, epochs=epochs, initial_epoch=FIT_EPOCHS,
        shuffle=False, callbacks=callbacks, verbose=0,
    )
    arrays = state_of(model, model.optimizer)
    arrays["resumed_at"] = np.array(resumed_at)
    np.savez(os.path.join(out, f"resume.np{size}.rank{rank}.npz"), **arrays)


def run_die(rank: int, size: int) -> None:
    ids, feats, targets = global_batches(1000, seed=3)
    model = make_model(seed=0)
    optimizer = DistributedOptimizer(make_optimizer("radam"))
    broadcast_state(model, optimizer)

    @tf.function
    def step(i, f, t):
        with tf.GradientTape() as tape:
            loss = mse(model, i, f, t)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    ids, feats, targets = (shard(a, rank, size) for a in (ids, feats, targets))
    for s in range(1000):
        if rank == 1 and s == 3:
            print(f"rank {rank}: killing myself at step {s} at t={time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        step(ids[s], feats[s], targets[s])
        time.sleep(0.05)
    print("rank %d finished all steps: the job did not fail" % rank, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["main", "resume", "die"])
    parser.add_argument("--out", required=True, help="folder for the .npz results")
    parser.add_argument("--checkpoint", help="resume: the .keras file to resume from")
    parser.add_argument("--only", nargs="*", help="main: run only these scenarios")
    args = parser.parse_args(argv)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "main":
        names = args.only or list(SCENARIOS) + ["fit", "mismatch"]
        for name in names:
            if name == "fit":
                run_fit(rank, size, args.out)
            elif name == "mismatch":
                run_mismatch(rank, args.out)
            else:
                run_loop(name, rank, size, args.out)
        if rank == 0:  # the single-process references, after the collective part
            for name in names:
                if name == "mismatch":
                    continue
                if name == "fit":
                    run_fit_reference(args.out, FIT_EPOCHS)
                    run_fit_reference(args.out, FIT_EPOCHS + 1)
                else:
                    run_loop(name, 0, 1, args.out, reference=True)
    elif args.mode == "resume":
        run_resume(rank, size, args.out, args.checkpoint)
    else:
        run_die(rank, size)
    print(f"rank {rank}/{size}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
