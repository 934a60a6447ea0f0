"""Keras 3's base-optimizer features under MultiWorkerMirroredStrategy, two worker processes;
run by tests/test_keras_features_mwms.py:

    radam-dist launch --workers 2 -- python keras_features_mwms.py --out r.json

For RectifiedAdam (``radam``) and Lookahead(RectifiedAdam, sync_period=2) (``ranger``), each
case makes its variables and optimizer in the strategy's scope and runs a few steps through
``strategy.run`` in a tf.function, every replica given ``1 / num_replicas`` of each gradient
(halves are exact in float32, so the all-reduced sum is the full gradient bit for bit):

* ``constraint``: a NonNeg kernel whose first column starts negative (Lookahead's slow
  weights with it) and is pushed down by every step, its second column pushed up; an
  unconstrained bias pushed below zero;
* ``overwrite``: a variable with ``overwrite_with_gradient=True`` next to a trained kernel;
  steps 1-2 give every replica the whole target (Keras assigns each replica's copy its own
  gradient, no all-reduce: so the variable becomes the target), step 3 gives each replica
  half (each copy then holds its own half, as under MirroredStrategy);
* ``lso``: ``keras.optimizers.LossScaleOptimizer`` around an optimizer with
  ``loss_scale_factor=100``: one infinite step (skipped, scale halved), then three steps on
  gradients scaled by the scale;
* ``ema``: ``use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2``, four steps, the
  averages after each step and ``get_weights()`` at the end;
* ``clipnorm`` / ``global_clipnorm`` (1.0): gradients of varying size, clipped on some steps.

Every worker writes what it saw (its own copy of every variable after every step): the chief
to ``--out``, worker i to ``--out.i``. The test imports this file and runs the same cases
without a strategy (``run_case(name, kind, None)``) for the single-device values.
"""

import argparse
import json
import sys

import numpy as np

KINDS = ("radam", "ranger")
CASES = ("constraint", "overwrite", "lso", "ema", "clipnorm", "global_clipnorm")

GRADS = [np.array([[1.0, -2.0], [0.5, 3.0]], np.float32),
         np.array([4.0, -1.0], np.float32)]
START = [np.array([[0.3, 0.1], [0.05, 0.2]], np.float32), np.array([0.1, 0.2], np.float32)]
OVERWRITE_TARGETS = [np.array([5.0, 6.0], np.float32), np.array([-1.0, 2.0], np.float32),
                     np.array([8.0, -4.0], np.float32)]
# The kernel's first column starts negative (so do Lookahead's slow weights, its first
# values) and every step pushes it down; its second column is pushed up.
CONSTRAINT_START = [START[0] - np.array([1.0, 0.0], np.float32), START[1]]
CONSTRAINT_GRADS = [np.array([[2.0, -1.0], [1.5, -3.0]], np.float32),
                    np.array([5.0, 2.0], np.float32)]
LOSS_SCALE = 1024.0
CLIP_SIZES = (100.0, 0.01, 50.0, 0.2)  # norms far above, below and above 1


def _tf():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf


def optimizer(kind, sync_period=2, **kwargs):
    import radam_dist  # pylint: disable=import-outside-toplevel

    kwargs.setdefault("learning_rate", 0.1)
    inner = radam_dist.RectifiedAdam(**kwargs)
    return inner if kind == "radam" else radam_dist.Lookahead(inner, sync_period=sync_period)


class Runner:
    """Variables, optimizers and steps on one worker (``strategy``) or one device (None)."""

    def __init__(self, strategy):
        self.strategy = strategy

    def scope(self):
        import contextlib  # pylint: disable=import-outside-toplevel
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def variables(self, *values):
        import keras  # pylint: disable=import-outside-toplevel
        with self.scope():
            return [keras.Variable(np.asarray(v, np.float32)) for v in values]

    def make(self, factory, build=None):
        with self.scope():
            opt = factory()
            if build is not None:
                opt.build(build)
        return opt

    def stepper(self, opt, variables):
        """``step(grads, split)``: one ``opt.apply``. Under the strategy each replica gets
        ``1 / num_replicas`` of gradient i where ``split[i]``, else all of it; without one,
        the full gradients (the all-reduced sum the replicas' parts add up to)."""
        tf = _tf()
        if self.strategy is None:
            def step(grads, split=None):
                opt.apply([tf.constant(g, tf.float32) for g in grads], variables)
            return step
        n = self.strategy.num_replicas_in_sync
        compiled = {}

        def step(grads, split=None):
            split = tuple(split or (True,) * len(grads))
            if split not in compiled:
                @tf.function
                def run(*grads):
                    def replica(*grads):
                        opt.apply([g / n if part else g for g, part in zip(grads, split)],
                                  variables)
                    self.strategy.run(replica, args=grads)
                compiled[split] = run
            compiled[split](*[tf.constant(g, tf.float32) for g in grads])
        return step

    def local(self, variable):
        """This worker's copy of ``variable`` (MWMS: one replica per worker) as a list."""
        import keras  # pylint: disable=import-outside-toplevel
        value = variable.value if isinstance(variable, keras.Variable) else variable
        if self.strategy is not None:
            copies = self.strategy.experimental_local_results(value)
            assert len(copies) == 1, f"one replica per worker, got {len(copies)}"
            value = copies[0]
        return np.asarray(value).tolist()

    def snapshot(self, variables):
        return [self.local(v) for v in variables]


def _int(counter):
    tf = _tf()
    import keras  # pylint: disable=import-outside-toplevel
    value = counter.value if isinstance(counter, keras.Variable) else counter
    return int(tf.convert_to_tensor(value))


def _inner(opt):
    return getattr(opt, "inner_optimizer", opt)


# -- the cases --------------------------------------------------------------------------------
def case_constraint(run, kind):
    import keras  # pylint: disable=import-outside-toplevel
    variables = run.variables(*CONSTRAINT_START)
    variables[0].constraint = keras.constraints.NonNeg()
    opt = run.make(lambda: optimizer(kind, learning_rate=0.5))
    step = run.stepper(opt, variables)
    steps = []
    for _ in range(4):  # two synchronisations for Lookahead
        step(CONSTRAINT_GRADS)
        steps.append(run.snapshot(variables))
    return {"steps": steps, "iterations": _int(opt.iterations)}


def case_overwrite(run, kind):
    variables = run.variables(*START)
    variables[1].overwrite_with_gradient = True
    opt = run.make(lambda: optimizer(kind, sync_period=1))  # Lookahead syncs every step
    step = run.stepper(opt, variables)
    steps = []
    for i, target in enumerate(OVERWRITE_TARGETS):
        # Steps 1-2: each replica gives the whole target for the overwritten variable;
        # step 3: each gives its share, as it does for the kernel.
        step([GRADS[0], target], split=(True, i == 2))
        steps.append(run.snapshot(variables))
    return {"steps": steps, "iterations": _int(opt.iterations),
            "num_replicas": run.strategy.num_replicas_in_sync if run.strategy else 1}


def case_lso(run, kind):
    """With a strategy: LossScaleOptimizer (built in the scope, as Keras' fit does) around an
    optimizer whose own loss_scale_factor is 100; without: the plain optimizer on the
    unscaled gradients (the reference: unscaled exactly once)."""
    import keras  # pylint: disable=import-outside-toplevel
    variables = run.variables(*START)
    if run.strategy is None:
        opt = run.make(lambda: optimizer(kind))
        step = run.stepper(opt, variables)
        steps = []
        for _ in range(3):
            step(GRADS)
            steps.append(run.snapshot(variables))
        return {"steps": steps, "iterations": _int(opt.iterations)}
    lso = run.make(lambda: keras.optimizers.LossScaleOptimizer(
        optimizer(kind, loss_scale_factor=100.0), initial_scale=LOSS_SCALE), build=variables)
    factors = [lso.inner_optimizer.loss_scale_factor,
               _inner(lso.inner_optimizer).loss_scale_factor]
    step = run.stepper(lso, variables)
    step([np.full_like(GRADS[0], np.inf), GRADS[1] * LOSS_SCALE])  # skipped: scale / 2
    skipped = {"variables": run.snapshot(variables), "iterations": _int(lso.iterations),
               "scale": float(lso.scale_loss(1.0))}
    scale = skipped["scale"]
    steps = []
    for _ in range(3):
        step([g * np.float32(scale) for g in GRADS])
        steps.append(run.snapshot(variables))
    return {"steps": steps, "iterations": _int(lso.iterations), "skipped": skipped,
            "inner_factors": factors, "scale": float(lso.scale_loss(1.0))}


def case_ema(run, kind):
    variables = run.variables(*START)
    opt = run.make(lambda: optimizer(kind, use_ema=True, ema_momentum=0.9,
                                     ema_overwrite_frequency=2))
    step = run.stepper(opt, variables)
    steps, averages = [], []
    for _ in range(4):
        step(GRADS)
        steps.append(run.snapshot(variables))
        averages.append(run.snapshot(_inner(opt)._model_variables_moving_average))
    return {"steps": steps, "averages": averages, "iterations": _int(opt.iterations),
            "weights": [np.asarray(w).tolist() for w in opt.get_weights()]}


def _case_clip(run, kind, clip):
    variables = run.variables(*START)
    opt = run.make(lambda: optimizer(kind, **{clip: 1.0}))
    step = run.stepper(opt, variables)
    steps = []
    for size in CLIP_SIZES:
        step([g * np.float32(size) for g in GRADS])
        steps.append(run.snapshot(variables))
    return {"steps": steps, "iterations": _int(opt.iterations)}


def case_clipnorm(run, kind):
    return _case_clip(run, kind, "clipnorm")


def case_global_clipnorm(run, kind):
    return _case_clip(run, kind, "global_clipnorm")


def run_case(name, kind, strategy):
    return globals()[f"case_{name}"](Runner(strategy), kind)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import radam_dist.distribute  # pylint: disable=import-outside-toplevel

    strategy = radam_dist.distribute.strategy_from_environment()
    tf = _tf()
    tf.get_logger().setLevel("ERROR")  # each case's new tf.function reads as "retracing"
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    index = strategy.cluster_resolver.task_id
    result = {"num_replicas": strategy.num_replicas_in_sync, "cases": {}, "errors": {}}
    for name in CASES:  # the same order on every worker: the collectives pair up
        for kind in KINDS:
            key = f"{name}-{kind}"
            print(f"case {key}", flush=True)
            try:
                result["cases"][key] = run_case(name, kind, strategy)
            except Exception as err:  # pylint: disable=broad-except
                # A failure is reported, not hidden; the collectives of later cases may
                # then no longer pair up, so stop here.
                result["errors"][key] = f"{type(err).__name__}: {err}"
                print(f"case {key} failed: {result['errors'][key]}", flush=True)
                break
        if result["errors"]:
            break
    out = args.out if index == 0 else f"{args.out}.{index}"
    with open(out, "w") as f:
        json.dump(result, f)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
