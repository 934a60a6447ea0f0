"""The distributed demo's train script: one small model trained with model.fit and
Lookahead(RectifiedAdam) on one device and under a strategy, same data, same start.

    python examples/distribute/train.py --strategy mirrored --out r.json
    radam-dist launch --workers 2 -- python examples/distribute/train.py \\
        --strategy mwms --out r.json

It is also a template: the MWMS branch is all a Keras 3 script needs under
``radam-dist launch`` or a platform that sets TF_CONFIG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

GLOBAL_BATCH = 32
STEPS = 12
VOCAB = 50

log = logging.getLogger("radam_dist.demo.distribute")


def _parse(argv):
    parser = argparse.ArgumentParser(description="radam_dist distributed demo: one run")
    parser.add_argument("--strategy", choices=["mirrored", "mwms"], required=True)
    parser.add_argument("--out", required=True, help="JSON file for the two trajectories")
    return parser.parse_args(argv)


def _data():
    rs = np.random.RandomState(0)
    n = GLOBAL_BATCH * STEPS
    ids = rs.randint(0, VOCAB, size=(n, 4)).astype("int32")
    feats = rs.randn(n, 8).astype("float32")
    y = (np.tanh(feats[:, :1]) + 0.05 * rs.randn(n, 1)).astype("float32")
    return ids, feats, y


def _model(keras, radam_dist):
    ids = keras.Input((4,), dtype="int32")
    feats = keras.Input((8,))
    embedded = keras.layers.Flatten()(keras.layers.Embedding(VOCAB, 8)(ids))
    hidden = keras.layers.Dense(16, activation="tanh")(
        keras.layers.Concatenate()([embedded, feats]))
    model = keras.Model([ids, feats], keras.layers.Dense(1)(hidden))
    rs = np.random.RandomState(1)
    model.set_weights([(0.2 * rs.standard_normal(w.shape)).astype("float32")
                       for w in model.get_weights()])
    optimizer = radam_dist.Lookahead(
        radam_dist.RectifiedAdam(learning_rate=0.01, weight_decay=1e-4), sync_period=4)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _fit(keras, model, data):
    weights = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: weights.append(
            [w.ravel().tolist() for w in model.get_weights()]))
    ids, feats, y = data
    model.fit([ids, feats], y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[record])
    return weights


def main(argv=None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import tensorflow as tf

    if args.strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import radam_dist
    from radam_dist.distribute import enable_multi_worker_fit

    if args.strategy == "mwms":
        enable_multi_worker_fit()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG
    else:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    data = _data()
    reference = _fit(keras, _model(keras, radam_dist), data)
    with strategy.scope():
        model = _model(keras, radam_dist)
    distributed = _fit(keras, model, data)
    task = os.environ.get("RADAM_DIST_TASK", "local")
    if task in ("local", "worker:0"):
        with open(args.out, "w") as f:
            json.dump({"strategy": type(strategy).__name__,
                       "num_replicas": strategy.num_replicas_in_sync,
                       "reference": reference, "distributed": distributed}, f)
    log.info("%s: %d steps done", task, len(distributed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
