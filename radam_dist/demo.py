"""``make demo``: RectifiedAdam, Ranger and Adam side by side, then the distributed parts.

Trains the same small model (an Embedding, so the optimizers see sparse gradients, and a
dense tower) on a synthetic task that the demo generates itself, with Keras progress bars,
prints a comparison table and writes ``out/loss_curves.png``. Then it runs each
distributed capability's own short demo (tf.distribute, Horovod, the gRPC parameter
server) and prints what each reports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import time
from typing import Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import radam_dist  # noqa: E402

logger = logging.getLogger("radam_dist.demo")

NUM_CATEGORIES = 200
NUM_FEATURES = 12


def make_dataset(n: int, seed: int):
    """A classification task with a categorical and a numeric part, generated locally."""
    rng = np.random.RandomState(seed)
    category = rng.randint(0, NUM_CATEGORIES, size=(n, 1)).astype(np.int32)
    features = rng.randn(n, NUM_FEATURES).astype(np.float32)
    effect = np.random.RandomState(1234).randn(NUM_CATEGORIES).astype(np.float32)
    weights = np.random.RandomState(4321).randn(NUM_FEATURES).astype(np.float32)
    logits = 1.5 * effect[category[:, 0]] + features @ weights / 2 + np.sin(3 * features[:, 0])
    labels = (logits + 0.3 * rng.randn(n) > 0).astype(np.float32)[:, None]
    return (category, features), labels


def build_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    category = keras.Input((1,), dtype="int32", name="category")
    features = keras.Input((NUM_FEATURES,), name="features")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(NUM_CATEGORIES, 8)(category))
    x = keras.layers.Concatenate()([embedded, features])
    x = keras.layers.Dense(64, activation="relu")(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    return keras.Model([category, features], keras.layers.Dense(1, activation="sigmoid")(x))


def optimizers(learning_rate: float) -> Dict[str, keras.optimizers.Optimizer]:
    return {
        "Adam (Keras 3)": keras.optimizers.Adam(learning_rate),
        "RectifiedAdam": radam_dist.RectifiedAdam(learning_rate),
        "Lookahead(RectifiedAdam)": radam_dist.Lookahead(
            radam_dist.RectifiedAdam(learning_rate), sync_period=6, slow_step_size=0.5
        ),
    }


def compare_optimizers(epochs: int, batch_size: int, learning_rate: float, verbose: int):
    train_x, train_y = make_dataset(6000, seed=0)
    val_x, val_y = make_dataset(2000, seed=1)
    results = {}
    for name, optimizer in optimizers(learning_rate).items():
        print(f"\n== {name} ==")
        model = build_model(seed=7)  # same initial weights for every optimizer
        model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
        start = time.perf_counter()
        history = model.fit(
            train_x, train_y, validation_data=(val_x, val_y), epochs=epochs,
            batch_size=batch_size, shuffle=True, verbose=verbose,
        )
        results[name] = dict(history.history, seconds=time.perf_counter() - start)
    return results


def print_table(results) -> None:
    header = f"{'optimizer':<26} {'train loss':>10} {'val loss':>9} {'val acc':>8} {'best val':>9} {'s/epoch':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, h in results.items():
        epochs = len(h["loss"])
        print(
            f"{name:<26} {h['loss'][-1]:>10.4f} {h['val_loss'][-1]:>9.4f} "
            f"{h['val_accuracy'][-1]:>8.3f} {min(h['val_loss']):>9.4f} {h['seconds'] / epochs:>8.2f}"
        )


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in results.items():
        epochs = np.arange(1, len(h["loss"]) + 1)
        axes[0].plot(epochs, h["loss"], marker="o", label=name)
        axes[1].plot(epochs, h["val_loss"], marker="o", label=name)
    for ax, title in zip(axes, ("training loss", "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Each distributed capability provides `run(out_dir) -> list[str]` in its own demo module.
DISTRIBUTED_PARTS = [
    ("tf.distribute: two replicas and a two-worker MWMS cluster", "radam_dist.distribute.demo"),
    ("Horovod: two ranks with horovodrun --gloo", "radam_dist.horovod.demo"),
    ("gRPC parameter server: two shards, two workers", "radam_dist.ps.demo"),
]


def run_distributed_parts(out_dir: str, skip: List[str]) -> bool:
    ok = True
    for title, module_name in DISTRIBUTED_PARTS:
        short = module_name.split(".")[1]
        print(f"\n== {title} ==")
        if short in skip:
            print("  skipped (--skip)")
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            print(f"  not available: {error}")
            ok = False
            continue
        start = time.perf_counter()
        part_dir = os.path.join(out_dir, short)
        os.makedirs(part_dir, exist_ok=True)
        try:
            lines = module.run(part_dir)
        except Exception as error:  # a demo part failing must not hide the others
            logger.exception("%s failed", module_name)
            print(f"  FAILED: {error}")
            ok = False
            continue
        for line in lines:
            print(f"  {line}")
        print(f"  ({time.perf_counter() - start:.1f} s)")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radam_dist.demo",
        description="Train one model with Adam, RectifiedAdam and Lookahead(RectifiedAdam), "
        "compare them, then run the distributed demos (tf.distribute, Horovod, parameter server).",
    )
    parser.add_argument("--epochs", type=int, default=8, help="epochs per optimizer (default 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--out", default="out", help="folder for the plot and logs (default out/)")
    parser.add_argument(
        "--skip", action="append", default=[], choices=["distribute", "horovod", "ps"],
        help="skip a distributed part (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-batch progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)

    results = compare_optimizers(args.epochs, args.batch_size, args.learning_rate, 2 if args.quiet else 1)
    print_table(results)
    plot_path = os.path.join(args.out, "loss_curves.png")
    plot(results, plot_path)
    print(f"\nloss curves: {plot_path}")
    ok = run_distributed_parts(args.out, args.skip)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
