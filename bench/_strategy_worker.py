"""One process of bench/strategy_step.py: times optimizer steps under a tf.distribute strategy.

    python bench/_strategy_worker.py step --strategy mirrored --sets resnet50,large
    TF_CONFIG=... python bench/_strategy_worker.py step --strategy mwms ...   # each worker
    TF_CONFIG=... python bench/_strategy_worker.py fit ...                     # each worker

``step``: ``apply_gradients`` inside ``strategy.run`` in one tf.function, on the same
mirrored variables and gradients for every optimizer, candidates taking turns (each turn
starting with the next one), the XLA triad's bandwidth measured in every turn. The
per-variable rows are the same optimizer objects as the fused rows (same slots, so the
transformer set fits in memory), traced with ``RADAM_DIST_FUSED=0`` (the switch is read when
a function traces).

``fit``: ``model.fit`` on an Embedding + Dense model, one epoch of ``--fit-steps`` steps per
turn and optimizer; a callback times each batch (end to end, waiting for the step).

Every worker prints one ``BENCH_RESULT`` JSON line (bench/_common.emit).
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
import time
from typing import Callable, Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # after PYTHONPATH: strategy_step.py --code DIR wins

from _common import SHAPE_SETS, emit, make_arrays, parameter_count, rotated, time_runs  # noqa: E402

ADAM = "Keras 3 Adam"
RADAM = "RectifiedAdam"
LOOKAHEAD = "Lookahead(RectifiedAdam)"
PER_VARIABLE = " (per-variable, RADAM_DIST_FUSED=0)"
XLA_CHUNKS = " (XLA chunks, RADAM_DIST_NATIVE=0)"
SWITCHES = ("RADAM_DIST_FUSED", "RADAM_DIST_NATIVE")
FAST = {"RADAM_DIST_FUSED": "1", "RADAM_DIST_NATIVE": "1"}
FLOOR = "floor: the gradients' all-reduce alone"
# MWMS: radam_dist all-reduces large gradients one by one (gradient_sums.all_reduce_large_apart)
SPLIT_FLOOR = "floor: radam_dist's all-reduce alone (large gradients one by one)"


def _strategy(kind: str):
    import tensorflow as tf

    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if "TF_CONFIG" not in os.environ:
        raise SystemExit("--strategy mwms needs TF_CONFIG (bench/strategy_step.py sets it)")
    return tf.distribute.MultiWorkerMirroredStrategy()


def _optimizers() -> Dict[str, Callable]:
    import keras

    import radam_dist

    return {
        ADAM: lambda: keras.optimizers.Adam(learning_rate=1e-3),
        RADAM: lambda: radam_dist.RectifiedAdam(learning_rate=1e-3),
        LOOKAHEAD: lambda: radam_dist.Lookahead(radam_dist.RectifiedAdam(learning_rate=1e-3)),
    }


def _set_switches(switches: Dict[str, str]) -> None:
    """The fast-path switches a candidate traces and runs under (read when it traces)."""
    os.environ.update(switches)


def _clear_switches() -> None:
    for name in SWITCHES:
        os.environ.pop(name, None)


def _variants(name: str, per_variable: bool):
    """(label, switches) of an optimizer's rows: the default path; its XLA chunks without the
    one-pass kernel (RectifiedAdam in step mode); the per-variable path (--per-variable)."""
    variants = [(name, FAST)]
    if per_variable and name != ADAM:
        variants.append((name + PER_VARIABLE, {**FAST, "RADAM_DIST_FUSED": "0"}))
    return variants


def step_mode(args) -> dict:
    import tensorflow as tf

    strategy = _strategy(args.strategy)
    from optimizer_step import XlaTriad

    triad = XlaTriad(args.triad_mib)
    out = {"strategy": args.strategy, "replicas": strategy.num_replicas_in_sync,
           "task": os.environ.get("TF_CONFIG") and __import__("json").loads(
               os.environ["TF_CONFIG"])["task"], "sets": {}}
    for shape_set in args.sets.split(","):
        shapes = SHAPE_SETS[shape_set]()
        values, grads_np = make_arrays(shapes)
        with strategy.scope():
            variables = [tf.Variable(v) for v in values]
        del values

        def per_replica_grads(ctx, grads_np=grads_np):
            return [tf.constant(g) for g in grads_np]

        grads = strategy.experimental_distribute_values_from_function(per_replica_grads)
        del grads_np
        sync = lambda: variables[-1].numpy()  # noqa: E731
        makers = _optimizers()
        steps: Dict[str, Callable] = {}
        switch: Dict[str, Dict[str, str]] = {}
        for name, make in makers.items():
            with strategy.scope():
                optimizer = make()
                optimizer.build(variables)
            variants = _variants(name, args.per_variable)
            if name == RADAM:
                variants.append((name + XLA_CHUNKS, {**FAST, "RADAM_DIST_NATIVE": "0"}))
            for label, switches in variants:
                def replica_step(g, optimizer=optimizer):
                    optimizer.apply_gradients(zip(g, variables))

                @tf.function
                def step(replica_step=replica_step):
                    strategy.run(replica_step, args=(grads,))

                # Each candidate has its own function: the retracing warning would be noise.
                step._omit_frequent_tracing_warning = True  # pylint: disable=protected-access

                _set_switches(switches)  # read when the function traces
                time_runs(step, sync, steps=0, runs=0, warmup=2)
                steps[label] = step
                switch[label] = switches
        def all_reduce_only(g):
            tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, g)

        @tf.function
        def floor():  # collectives are stateful: tf.function keeps them without a consumer
            strategy.run(all_reduce_only, args=(grads,))

        time_runs(floor, sync, steps=0, runs=0, warmup=2)
        steps[FLOOR], switch[FLOOR] = floor, FAST
        split_floor = None
        if args.strategy == "mwms":
            from radam_dist.distribute import gradient_sums

            def keras_sum(pairs):
                reduced = tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.SUM, [g for g, _ in pairs])
                return list(zip(reduced, [v for _, v in pairs]))

            def split_only(g):
                gradient_sums.all_reduce_large_apart(list(zip(g, variables)), keras_sum)

            @tf.function
            def split_floor():
                strategy.run(split_only, args=(grads,))

            time_runs(split_floor, sync, steps=0, runs=0, warmup=2)
            steps[SPLIT_FLOOR], switch[SPLIT_FLOOR] = split_floor, FAST
        times: Dict[str, List[float]] = {name: [] for name in steps}
        bandwidths: List[float] = []
        for turn in range(args.runs):
            for name in rotated(list(steps), turn):
                _set_switches(switch[name])
                times[name] += time_runs(steps[name], sync, args.steps, runs=1, warmup=0)
            bandwidths.append(triad.bandwidth(repeats=3))
        _clear_switches()
        out["sets"][shape_set] = {
            "variables": len(shapes), "parameters": parameter_count(shapes),
            "per_run_s": times, "triad_b_s": bandwidths}
        steps.clear()
        del variables, grads, optimizer, step, floor, split_floor
        gc.collect()
    return out


def fit_mode(args) -> dict:
    import numpy as np
    import tensorflow as tf

    strategy = _strategy(args.strategy)
    import keras

    from radam_dist.distribute import enable_multi_worker_fit

    enable_multi_worker_fit()
    rs = np.random.RandomState(0)
    n = args.fit_batch * 16
    ids = rs.randint(0, args.vocab, (n, args.ids_per_example)).astype("int32")
    y = rs.randn(n, 1).astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = (tf.data.Dataset.from_tensor_slices((ids, y)).repeat()
               .batch(args.fit_batch, drop_remainder=True).with_options(options))

    def build_model():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((args.ids_per_example,), dtype="int32")
        x = keras.layers.Embedding(args.vocab, args.embed_dim)(inputs)
        x = keras.layers.Flatten()(x)
        for _ in range(2):
            x = keras.layers.Dense(args.hidden, activation="relu")(x)
        return keras.Model(inputs, keras.layers.Dense(1)(x))

    class BatchTimer(keras.callbacks.Callback):
        """Seconds from one batch's end to the next's (the step, waited for)."""

        def on_train_begin(self, logs=None):
            self.times, self._last = [], None

        def on_train_batch_end(self, batch, logs=None):
            int(self.model.optimizer.iterations.numpy())  # wait for the step
            now = time.perf_counter()
            if self._last is not None:
                self.times.append(now - self._last)
            self._last = now

    models, switch = {}, {}
    for name, make in _optimizers().items():
        for label, switches in _variants(name, args.per_variable):
            with strategy.scope():
                model = build_model()
                model.compile(optimizer=make(), loss="mse")
            _set_switches(switches)
            model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # trace, warm up
            models[label], switch[label] = model, switches
    params = models[ADAM].count_params()
    times: Dict[str, List[float]] = {name: [] for name in models}
    for turn in range(args.runs):
        for name in rotated(list(models), turn):
            _set_switches(switch[name])
            timer = BatchTimer()
            models[name].fit(dataset, epochs=1, steps_per_epoch=args.fit_steps, verbose=0,
                             callbacks=[timer])
            times[name] += timer.times[1:]  # the first gap includes the iterator's start
    _clear_switches()
    return {"strategy": args.strategy, "replicas": strategy.num_replicas_in_sync,
            "parameters": int(params), "vocab": args.vocab, "embed_dim": args.embed_dim,
            "hidden": args.hidden, "global_batch": args.fit_batch, "steps_s": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["step", "fit"])
    parser.add_argument("--strategy", choices=["mirrored", "mwms"], default="mwms")
    parser.add_argument("--sets", default="resnet50,transformer,large")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--per-variable", action="store_true")
    parser.add_argument("--triad-mib", type=int, default=128)
    parser.add_argument("--fit-steps", type=int, default=20)
    parser.add_argument("--fit-batch", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50000)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--ids-per-example", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    result = step_mode(args) if args.mode == "step" else fit_mode(args)
    import radam_dist

    result["radam_dist"] = str(pathlib.Path(radam_dist.__file__).parent)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
