"""MWMS ``model.fit`` with ZeRO-1 Lookahead(RectifiedAdam) and a checkpoint, written as Keras
scripts write it; run by tests/test_zero_checkpoints.py on two workers:

    radam-dist launch --workers 2 -- python zero_chief_checkpoint.py --mode MODE --dir D --out O

Modes:
* ``keras-checkpoint-on-chief``: ``keras.callbacks.ModelCheckpoint`` in the chief's callbacks
  only (the usual pattern); must fail on both workers with "every worker must save";
* ``save-on-chief-after-fit``: ``model.save`` on the chief only after ``fit``; the same;
* ``radam-dist-checkpoint``: ``radam_dist.callbacks.ModelCheckpoint`` on every worker; the
  chief's files land in --dir, each worker writes ``O.<index>`` with the optimizer's whole
  state after fit (``get_weights``, a collective on every worker) and the scratch folders
  its callback left behind (none expected).
"""

import argparse
import glob
import json
import os
import tempfile

parser = argparse.ArgumentParser()
parser.add_argument("--mode", required=True, choices=["keras-checkpoint-on-chief",
                                                      "save-on-chief-after-fit",
                                                      "radam-dist-checkpoint"])
parser.add_argument("--dir", required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import radam_dist  # noqa: E402
from radam_dist.distribute import current_task, enable_multi_worker_fit  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
enable_multi_worker_fit()
index = current_task()["index"]
chief = index == 0
scratch_root = os.path.join(args.dir + "-tmp", f"worker-{index}")
os.makedirs(scratch_root, exist_ok=True)
tempfile.tempdir = scratch_root  # where this worker's callback makes its scratch folders
os.makedirs(args.dir, exist_ok=True)

rng = np.random.default_rng(7)
x = rng.normal(size=(96, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(96, 1))).astype("float32")

keras.utils.set_random_seed(0)
with strategy.scope():
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="tanh",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=1)),
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=2)),
    ])
    optimizer = radam_dist.Lookahead(
        radam_dist.RectifiedAdam(learning_rate=0.02, shard_optimizer_state=True),
        sync_period=4)
    model.compile(optimizer=optimizer, loss="mse")


class Trained(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        print(f"trained epoch {epoch + 1}", flush=True)


pattern = os.path.join(args.dir, "epoch-{epoch}.keras")
callbacks = [Trained()]
if args.mode == "keras-checkpoint-on-chief" and chief:
    callbacks.append(keras.callbacks.ModelCheckpoint(pattern))
elif args.mode == "radam-dist-checkpoint":
    callbacks.append(radam_dist.callbacks.ModelCheckpoint(pattern))
epochs = 1 if args.mode == "save-on-chief-after-fit" else 2
model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
if args.mode == "save-on-chief-after-fit":
    if chief:
        model.save(os.path.join(args.dir, "final.keras"))
else:
    weights = [w.tolist() for w in optimizer.get_weights()]  # a collective: every worker
    with open(f"{args.out}.{index}" if not chief else args.out, "w") as f:
        left = glob.glob(os.path.join(scratch_root, "radam_dist_checkpoint_*"))
        json.dump({"weights": weights, "iterations": int(optimizer.iterations.numpy()),
                   "scratch_left": sorted(left)}, f)
print("done", flush=True)
