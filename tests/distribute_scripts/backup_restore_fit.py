"""MWMS ``model.fit`` with Lookahead(RectifiedAdam) and keras.callbacks.BackupAndRestore, for
``radam-dist launch --max-restarts``: worker 1 can SIGKILL itself mid-epoch in attempt 0.

    radam-dist launch --workers 2 --max-restarts 1 -- \
        python backup_restore_fit.py --backup-dir B --out result.json --kill-at 1,2

Each worker backs up into its own directory (BackupAndRestore writes one file per worker; two
workers must not write the same HDF5 file). Worker 0 writes the final weights, the optimizer's
iteration count and the epochs this attempt ran to --out.
"""

import argparse
import json
import os
import signal

parser = argparse.ArgumentParser()
parser.add_argument("--backup-dir", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--kill-at", default="", help="EPOCH,BATCH: worker 1 SIGKILLs itself after "
                    "that batch (0-based), in attempt 0 only")
parser.add_argument("--collective-timeout", type=float, default=0,
                    help="seconds a collective may take before it fails (0: no limit)")
args = parser.parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import radam_dist  # noqa: E402
from radam_dist.distribute import current_task, enable_multi_worker_fit  # noqa: E402

GLOBAL_BATCH = 16
SAMPLES = 96  # 6 steps per epoch

options = (tf.distribute.experimental.CommunicationOptions(timeout_seconds=args.collective_timeout)
           if args.collective_timeout else None)
strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
enable_multi_worker_fit()
index = current_task()["index"]
restart = int(os.environ.get("RADAM_DIST_RESTART", "0"))

rng = np.random.default_rng(7)
x = rng.normal(size=(SAMPLES, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(SAMPLES, 1))).astype("float32")

keras.utils.set_random_seed(0)
with strategy.scope():
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="tanh",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=1)),
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=2)),
    ])
    optimizer = radam_dist.Lookahead(
        radam_dist.RectifiedAdam(learning_rate=0.02, total_steps=18, warmup_proportion=0.2,
                                 min_lr=0.001),
        sync_period=4)
    model.compile(optimizer=optimizer, loss="mse")
initial = [w.copy() for w in model.get_weights()]


class KillAt(keras.callbacks.Callback):
    """Simulates a preempted worker: SIGKILL, no cleanup, in the middle of an epoch."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.kill_epoch, self.kill_batch, self.epoch = epoch, batch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (self.kill_epoch, self.kill_batch):
            print(f"killing myself at epoch {self.epoch} batch {batch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


epochs = Epochs()
callbacks = [keras.callbacks.BackupAndRestore(os.path.join(args.backup_dir, f"worker-{index}")),
             epochs]
if args.kill_at and restart == 0 and index == 1:
    callbacks.append(KillAt(*map(int, args.kill_at.split(","))))
model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=args.epochs, shuffle=False, verbose=0,
          callbacks=callbacks)
print(f"attempt {restart} ran epochs {epochs.seen}", flush=True)
if index == 0:
    with open(args.out, "w") as f:
        json.dump({"restart": restart, "epochs": epochs.seen,
                   "iterations": int(optimizer.iterations.numpy()),
                   "initial": [w.tolist() for w in initial],
                   "weights": [w.tolist() for w in model.get_weights()]}, f)
