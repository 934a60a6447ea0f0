"""Times tensorflow-addons 0.23's RectifiedAdam (run with its own TF 2.15 interpreter).

Invoked by bench/optimizer_step.py as ``python _tfa_worker.py SET --steps N --runs R``;
prints one ``BENCH_RESULT {json}`` line: seconds per step for each mode.
"""

import argparse
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_addons as tfa  # noqa: E402

from _common import SHAPE_SETS, emit, make_arrays, summary, time_runs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape_set", choices=sorted(SHAPE_SETS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--modes", default="eager,function,jit_compile")
    args = parser.parse_args()
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    values, grads = make_arrays(SHAPE_SETS[args.shape_set]())
    variables = [tf.Variable(v) for v in values]
    grads = [tf.constant(g) for g in grads]
    del values
    result = {"tensorflow": tf.__version__, "tensorflow_addons": tfa.__version__, "modes": {}}
    for mode in args.modes.split(","):
        optimizer = tfa.optimizers.RectifiedAdam(learning_rate=1e-3)

        def step():
            optimizer.apply_gradients(zip(grads, variables))

        if mode == "function":
            step = tf.function(step)
        elif mode == "jit_compile":
            step = tf.function(step, jit_compile=True)
        times = time_runs(step, lambda: variables[0][..., :1].numpy(), args.steps, args.runs)
        result["modes"][mode] = summary(times)
        del optimizer, step
    emit(result)


if __name__ == "__main__":
    main()
