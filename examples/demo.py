"""``make demo`` (``python -m examples.demo`` from the checkout's root): RectifiedAdam, Ranger
and Adam side by side, then the distributed parts.

Trains the same small model (an Embedding, so the optimizers see sparse gradients, and a
dense tower) on a synthetic task that the demo generates itself, with Keras progress bars,
and prints a comparison table. Then the result RAdam is known for (Liu et al. 2019, "On the
Variance of the Adaptive Learning Rate and Beyond", the learning-rate robustness figures): the
same model and data trained with Adam without warmup, Adam with a linear warmup, RectifiedAdam
and Lookahead(RectifiedAdam) over a sweep of learning rates, the final validation loss of each.
``out/loss_curves.png`` shows the curves, the sweep and RectifiedAdam's effective learning rate
over the first steps; ``out/lr_sweep.json`` holds the measured numbers. Then it runs each
distributed capability's own short demo (tf.distribute, Horovod, the gRPC parameter server:
``examples/<part>/demo.py``) and prints what each reports.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
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


class _RecordEffectiveRate(keras.callbacks.Callback):
    """Keeps the ``effective_learning_rate`` that radam_dist.EffectiveLearningRate logs per batch."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.rates = steps, []

    def on_train_batch_end(self, batch, logs=None):
        if len(self.rates) < self.steps and logs and "effective_learning_rate" in logs:
            self.rates.append(float(logs["effective_learning_rate"]))


def compare_optimizers(epochs: int, batch_size: int, learning_rate: float, verbose: int,
                       record_steps: int = 0):
    train_x, train_y = make_dataset(6000, seed=0)
    val_x, val_y = make_dataset(2000, seed=1)
    results = {}
    for name, optimizer in optimizers(learning_rate).items():
        print(f"\n== {name} ==")
        model = build_model(seed=7)  # same initial weights for every optimizer
        model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
        recorder = _RecordEffectiveRate(record_steps)
        callbacks = [radam_dist.EffectiveLearningRate(), recorder] if name == "RectifiedAdam" else []
        start = time.perf_counter()
        history = model.fit(
            train_x, train_y, validation_data=(val_x, val_y), epochs=epochs,
            batch_size=batch_size, shuffle=True, verbose=verbose, callbacks=callbacks,
        )
        results[name] = dict(history.history, seconds=time.perf_counter() - start)
        if callbacks:
            results[name]["effective_learning_rate_per_step"] = recorder.rates
    return results


# --- the learning-rate sweep (RAdam paper, Liu et al. 2019) -------------------------------------

SWEEP_LEARNING_RATES = [float(f"{lr:.3g}") for lr in np.logspace(-4, -1, 6)]


class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * min(1, (step + 1) / warmup_steps)``: the warmup RAdam makes unnecessary."""

    def __init__(self, peak: float, warmup_steps: int):
        self.peak, self.warmup_steps = float(peak), int(warmup_steps)

    def __call__(self, step):
        fraction = keras.ops.minimum(1.0, (keras.ops.cast(step, "float32") + 1.0) / self.warmup_steps)
        return self.peak * fraction

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


def sweep_optimizers(learning_rate: float, warmup_steps: int) -> Dict[str, keras.optimizers.Optimizer]:
    return {
        "Adam, no warmup": keras.optimizers.Adam(learning_rate),
        f"Adam, linear warmup ({warmup_steps} steps)": keras.optimizers.Adam(
            LinearWarmup(learning_rate, warmup_steps)),
        "RectifiedAdam": radam_dist.RectifiedAdam(learning_rate),
        "Lookahead(RectifiedAdam)": radam_dist.Lookahead(
            radam_dist.RectifiedAdam(learning_rate), sync_period=6, slow_step_size=0.5),
    }


def learning_rate_sweep(epochs: int, batch_size: int, learning_rates: List[float]):
    """Final validation loss per optimizer and learning rate (NaN: the run diverged)."""
    train_x, train_y = make_dataset(6000, seed=0)
    val_x, val_y = make_dataset(2000, seed=1)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    warmup_steps = steps_per_epoch  # one epoch of linear warmup
    curves: Dict[str, List[float]] = {}
    print(f"\n== learning-rate sweep: {len(learning_rates)} rates x 4 optimizers, {epochs} epochs each ==")
    start = time.perf_counter()
    for lr in learning_rates:
        for name, optimizer in sweep_optimizers(lr, warmup_steps).items():
            model = build_model(seed=7)
            # One compiled loop per epoch: the sweep's time goes into training, not into Python.
            model.compile(optimizer=optimizer, loss="binary_crossentropy",
                          steps_per_execution=steps_per_epoch)
            history = model.fit(train_x, train_y, validation_data=(val_x, val_y), epochs=epochs,
                                batch_size=batch_size, shuffle=True, verbose=0)
            final = float(history.history["val_loss"][-1])
            curves.setdefault(name, []).append(final if math.isfinite(final) else float("nan"))
        print(f"  lr {lr:<8g} " + "  ".join(f"{n.split(' (')[0]}: {c[-1]:.4f}" for n, c in curves.items()),
              flush=True)
    return {"learning_rates": learning_rates, "epochs": epochs, "batch_size": batch_size,
            "warmup_steps": warmup_steps, "final_val_loss": curves,
            "seconds": time.perf_counter() - start}


def print_sweep(sweep) -> None:
    names = list(sweep["final_val_loss"])
    header = f"{'final val loss':<34}" + "".join(f"{lr:>9g}" for lr in sweep["learning_rates"])
    print("\n" + header + "\n" + "-" * len(header))
    for name in names:
        row = sweep["final_val_loss"][name]
        print(f"{name:<34}" + "".join(f"{v:>9.4f}" for v in row))
    print("  learning rates whose final validation loss is within 10% of the optimizer's best:")
    for name in names:
        row = sweep["final_val_loss"][name]
        finite = [v for v in row if math.isfinite(v)]
        best = min(finite) if finite else float("nan")
        near = [f"{lr:g}" for lr, v in zip(sweep["learning_rates"], row) if v <= 1.1 * best]
        diverged = sum(not math.isfinite(v) for v in row)
        print(f"  {name:<34} best {best:.4f}; within 10%: {', '.join(near) or 'none'}"
              + (f"; diverged at {diverged} rates" if diverged else ""))


def rectification_multiplier(steps: int, beta_2: float = 0.999, sma_threshold: float = 5.0):
    """r_t for steps 1..steps from radam_math (0 where RAdam takes its un-adapted momentum step)."""
    import tensorflow as tf

    from radam_dist import radam_math

    step = tf.range(1, steps + 1, dtype=tf.float32)
    _, r_t, rectified = radam_math.rectification(step, tf.constant(beta_2), tf.constant(sma_threshold))
    return np.where(rectified.numpy(), r_t.numpy(), 0.0)


def print_table(results) -> None:
    header = f"{'optimizer':<26} {'train loss':>10} {'val loss':>9} {'val acc':>8} {'best val':>9} {'s/epoch':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, h in results.items():
        epochs = len(h["loss"])
        print(
            f"{name:<26} {h['loss'][-1]:>10.4f} {h['val_loss'][-1]:>9.4f} "
            f"{h['val_accuracy'][-1]:>8.3f} {min(h['val_loss']):>9.4f} {h['seconds'] / epochs:>8.2f}"
        )


def _color(name: str) -> str:
    """The same colour for an optimizer in every panel."""
    if name.startswith("Lookahead"):
        return "C2"
    if name.startswith("RectifiedAdam"):
        return "C1"
    return "C3" if "linear warmup" in name else "C0"


def plot(results, path: str, sweep=None, settings: str = "", learning_rate: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if sweep else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows + 0.9), squeeze=False)
    for name, h in results.items():
        epochs = np.arange(1, len(h["loss"]) + 1)
        axes[0][0].plot(epochs, h["loss"], marker="o", label=name, color=_color(name))
        axes[0][1].plot(epochs, h["val_loss"], marker="o", label=name, color=_color(name))
    for ax, title in zip(axes[0], ("training loss", "validation loss")):
        ax.set_title(f"{title} per epoch, learning rate {learning_rate:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{title} (binary cross-entropy)")
        ax.grid(alpha=0.3)
        ax.legend()
    if sweep:
        ax = axes[1][0]
        lrs = sweep["learning_rates"]
        for name, values in sweep["final_val_loss"].items():
            values = np.array(values, dtype=float)
            line, = ax.plot(lrs, values, marker="o", label=name, color=_color(name))
            diverged = ~np.isfinite(values)
            if diverged.any():  # mark diverged runs at the top edge
                top = np.nanmax([np.nanmax(v) for v in sweep["final_val_loss"].values()])
                ax.scatter(np.array(lrs)[diverged], [top] * diverged.sum(), marker="x",
                           color=line.get_color(), label=f"{name}: diverged")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"validation loss after {sweep['epochs']} epochs")
        ax.set_title("learning-rate robustness (as in Liu et al. 2019)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)

        ax = axes[1][1]
        rates = results.get("RectifiedAdam", {}).get("effective_learning_rate_per_step", [])
        if rates:
            steps = np.arange(1, len(rates) + 1)
            r_t = rectification_multiplier(len(rates))
            ax.plot(steps, np.array(rates) * r_t, color=_color("RectifiedAdam"),
                    label="RectifiedAdam: effective rate x r_t (adaptive step)")
            momentum = r_t == 0
            ax.scatter(steps[momentum], np.array(rates)[momentum] * 0, marker="|", color="C3",
                       label=f"RectifiedAdam: un-adapted momentum steps ({int(momentum.sum())})")
            peak = rates[0]
            warm = sweep["warmup_steps"]
            ax.plot(steps, peak * np.minimum(1.0, steps / warm), "--", color=_color("Adam, linear warmup"),
                    label=f"Adam, linear warmup ({warm} steps)")
            ax.plot(steps, np.full_like(steps, peak, dtype=float), ":", color=_color("Adam"),
                    label="Adam, no warmup")
            ax.set_xlabel("training step")
            ax.set_ylabel("learning rate applied to the adaptive step")
            ax.set_title("RectifiedAdam's effective learning rate, first steps")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    if settings:
        fig.text(0.01, 0.005, settings, fontsize=8, va="bottom", ha="left", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if settings else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Each distributed capability provides `run(out_dir) -> list[str]` in its own demo module
# (examples/<part>/demo.py); <part> names the --skip choice and the folder under --out.
DISTRIBUTED_PARTS = [
    ("tf.distribute: two replicas and a two-worker MWMS cluster", "examples.distribute.demo"),
    ("Horovod: two ranks with horovodrun --gloo", "examples.horovod.demo"),
    ("gRPC parameter server: two shards, two workers", "examples.ps.demo"),
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


def _finite_or_null(value):
    """``value`` with every NaN / inf (a diverged run) as None: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description="Train one model with Adam, RectifiedAdam and Lookahead(RectifiedAdam), "
        "compare them, then run the distributed demos (tf.distribute, Horovod, parameter server).",
    )
    parser.add_argument("--epochs", type=int, default=8, help="epochs per optimizer (default 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--sweep-epochs", type=int, default=3,
                        help="epochs per run of the learning-rate sweep (0: no sweep; default 3)")
    parser.add_argument("--out", default="out", help="folder for the plot and logs (default out/)")
    parser.add_argument(
        "--skip", action="append", default=[], choices=["distribute", "horovod", "ps"],
        help="skip a distributed part (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-batch progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)

    record_steps = 3 * math.ceil(6000 / args.batch_size)
    results = compare_optimizers(args.epochs, args.batch_size, args.learning_rate,
                                 2 if args.quiet else 1, record_steps=record_steps)
    print_table(results)
    sweep = None
    if args.sweep_epochs > 0:
        sweep = learning_rate_sweep(args.sweep_epochs, args.batch_size, SWEEP_LEARNING_RATES)
        print_sweep(sweep)
        with open(os.path.join(args.out, "lr_sweep.json"), "w") as f:
            json.dump(_finite_or_null(sweep), f, indent=1, allow_nan=False)
        print(f"  ({sweep['seconds']:.1f} s)")
    settings = (
        f"Settings: synthetic binary task (6000 train / 2000 validation rows, Embedding(200, 8) + Dense 64-32-1, "
        f"same initial weights for every run), batch {args.batch_size}, beta_1 0.9, beta_2 0.999, "
        f"Lookahead sync_period 6 / slow_step_size 0.5. Top: lr={args.learning_rate:g}, {args.epochs} epochs. "
        + (f"Bottom left: {sweep['epochs']} epochs per run, learning rates {', '.join(f'{x:g}' for x in sweep['learning_rates'])}, "
           f"warmup = {sweep['warmup_steps']} steps (one epoch). Bottom right: radam_dist.EffectiveLearningRate "
           f"x r_t from radam_math.rectification (sma_threshold 5) in the top RectifiedAdam run."
           if sweep else ""))
    plot_path = os.path.join(args.out, "loss_curves.png")
    plot(results, plot_path, sweep, settings, args.learning_rate)
    print(f"\nloss curves and learning-rate sweep: {plot_path}")
    ok = run_distributed_parts(args.out, args.skip)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
