"""The fused step with and without its variable-by-variable order, against Keras 3 Adam.

radam_dist/fused.py chains the updates of a compiled chunk (``fused._after``): each
variable's m and v passes wait for the previous variable's last pass. Without the chain,
XLA's CPU scheduler runs every m and v pass of the chunk first and every variable pass
after them, which then re-reads m and v from memory rather than from cache. This script
times both on the same variables, in tf.function and under jit_compile, with Keras 3 Adam
as the anchor, taking turns run by run (each turn starting with the next variant), and
prints paired ratios.

    .venv/bin/python bench/fused_order.py                      # resnet50, about 2 minutes
    .venv/bin/python bench/fused_order.py --sets resnet50,transformer,small --runs 15
    .venv/bin/python bench/fused_order.py --sets small --order-min-elements 1   # order all
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHAPE_SETS, make_arrays, rotated  # noqa: E402

VARIANTS = ("Keras 3 Adam", "RectifiedAdam (ordered)", "RectifiedAdam (unordered)")


def _step(variant: str, variables, grads, jit: bool,
          order_min_elements: Optional[int]) -> Callable[[], None]:
    """A traced and compiled step of ``variant``; the unordered one is traced with
    ``fused._after`` as the identity, so its compiled chunks carry no chain, and the
    ordered one with ``fused.ORDER_MIN_ELEMENTS`` set to ``order_min_elements`` if given."""
    import keras
    import tensorflow as tf

    import radam_dist
    from radam_dist import fused

    if variant == VARIANTS[0]:
        optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    else:
        optimizer = radam_dist.RectifiedAdam(learning_rate=1e-3)
    optimizer.build(variables)

    @tf.function(jit_compile=jit)
    def step():
        optimizer.apply_gradients(zip(grads, variables))

    shipped = fused._after, fused.ORDER_MIN_ELEMENTS
    if variant == VARIANTS[2]:
        fused._after = lambda tensor, previous: tensor
    elif order_min_elements is not None:
        fused.ORDER_MIN_ELEMENTS = order_min_elements
    try:
        for _ in range(2):  # traces and compiles with the variant's settings
            step()
    finally:
        fused._after, fused.ORDER_MIN_ELEMENTS = shipped
    return step


def time_set(shape_set: str, runs: int, steps: int,
             order_min_elements: Optional[int] = None) -> Dict[Tuple[str, str], List[float]]:
    """Seconds per step, per (mode, variant), over ``runs`` turns."""
    import tensorflow as tf

    values, grads = make_arrays(SHAPE_SETS[shape_set]())
    variables = [tf.Variable(v) for v in values]
    grads = [tf.constant(g) for g in grads]
    del values
    sync = lambda: variables[-1].numpy()  # noqa: E731
    steps_by_key = {
        (mode, variant): _step(variant, variables, grads, mode == "jit_compile",
                               order_min_elements)
        for mode in ("function", "jit_compile") for variant in VARIANTS}
    sync()
    times: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps_by_key}
    for turn in range(runs):
        for key in rotated(list(steps_by_key), turn):
            step = steps_by_key[key]
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[key].append((time.perf_counter() - start) / steps)
    return times


def report(shape_set: str, times: Dict[Tuple[str, str], List[float]]) -> str:
    lines = [f"{shape_set}: median ms per step; paired = median over turns of the ratio",
             f"{'mode':<12} {'variant':<34} {'ms':>7} {'/ Adam':>7} {'/ unordered':>12}"]
    for (mode, variant), seconds in times.items():
        def paired(anchor: str) -> float:
            return statistics.median(
                a / b for a, b in zip(seconds, times[(mode, anchor)]))
        lines.append(f"{mode:<12} {variant:<34} {1e3 * statistics.median(seconds):7.2f} "
                     f"{paired(VARIANTS[0]):7.3f} {paired(VARIANTS[2]):12.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sets", default="resnet50",
                        help=f"comma-separated shape sets: {', '.join(SHAPE_SETS)}")
    parser.add_argument("--runs", type=int, default=11, help="turns (medians over them)")
    parser.add_argument("--steps", type=int, default=6, help="steps per run")
    parser.add_argument("--order-min-elements", type=int, default=None,
                        help="in the ordered variant, order the variables of at least this "
                             "many elements; None keeps fused.ORDER_MIN_ELEMENTS (65536)")
    args = parser.parse_args()
    sets = args.sets.split(",")
    unknown = [name for name in sets if name not in SHAPE_SETS]
    if unknown:
        parser.error(f"unknown shape set(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(SHAPE_SETS)}")
    for shape_set in sets:
        times = time_set(shape_set, args.runs, args.steps, args.order_min_elements)
        print(report(shape_set, times), flush=True)


if __name__ == "__main__":
    main()
