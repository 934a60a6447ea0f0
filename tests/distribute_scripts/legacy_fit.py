"""tf_keras (TF_USE_LEGACY_KERAS=1) model.fit with LegacyRectifiedAdam under MWMS, against
the same fit on one device. Also compares one device with the Keras 3 RectifiedAdam.

    TF_USE_LEGACY_KERAS=1 radam-dist launch --workers 2 -- python legacy_fit.py --out r.json
"""

import argparse
import json
import os
import sys

import numpy as np

os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from radam_dist.optimizers.legacy_keras import LegacyRectifiedAdam  # noqa: E402

GLOBAL_BATCH, VOCAB, STEPS = 16, 24, 10


def build(k, optimizer):
    """The model in Keras ``k`` (tf_keras or Keras 3), with fixed weights, compiled."""
    ids = k.Input((3,), dtype="int32")
    feats = k.Input((4,))
    emb = k.layers.Flatten()(k.layers.Embedding(VOCAB, 4)(ids))
    out = k.layers.Dense(1)(k.layers.Concatenate()([emb, feats]))
    model = k.Model([ids, feats], out)
    rs = np.random.RandomState(1)
    model.set_weights([(0.1 * rs.randn(VOCAB, 4)).astype("float32"),
                       (0.3 * rs.randn(16, 1)).astype("float32"), np.zeros((1,), "float32")])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def build_legacy(strategy):
    with strategy.scope():
        return build(tf_keras, LegacyRectifiedAdam(0.02, weight_decay=0.01))


def fit(k, model, data):
    """The weights after every batch of one epoch."""
    trajectory = []
    record = k.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: trajectory.append(
            [w.ravel().tolist() for w in model.get_weights()]))
    ids, feats, y = data
    model.fit([ids, feats], y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[record])
    return trajectory


def keras3_fit(data):
    """The same fit on one device with the Keras 3 model and radam_dist.RectifiedAdam."""
    import keras

    import radam_dist

    return fit(keras, build(keras, radam_dist.RectifiedAdam(0.02, weight_decay=0.01)), data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any op runs
    rs = np.random.RandomState(0)
    n = GLOBAL_BATCH * STEPS
    data = (rs.randint(0, VOCAB, (n, 3)).astype("int32"), rs.randn(n, 4).astype("float32"),
            rs.randn(n, 1).astype("float32"))
    reference_model = build_legacy(tf.distribute.get_strategy())
    with tf.GradientTape() as tape:
        pred = reference_model([data[0][:GLOBAL_BATCH], data[1][:GLOBAL_BATCH]])
        loss = tf.reduce_mean(tf.square(pred - data[2][:GLOBAL_BATCH]))
    sparse = isinstance(tape.gradient(loss, reference_model.trainable_variables)[0],
                        tf.IndexedSlices)
    reference = fit(tf_keras, reference_model, data)
    keras3 = keras3_fit(data)
    distributed = fit(tf_keras, build_legacy(strategy), data)
    if os.environ.get("RADAM_DIST_TASK", "worker:0") == "worker:0":
        with open(args.out, "w") as f:
            json.dump({"num_replicas": strategy.num_replicas_in_sync, "cases": {"fit-legacy": {
                "reference": reference, "distributed": distributed,
                "sparse_gradients": sparse}, "keras3-vs-legacy": {
                "reference": keras3, "distributed": reference, "sparse_gradients": sparse}}}, f)


if __name__ == "__main__":
    sys.exit(main())
