"""Two XLA effects the optimizer-step work rests on, measured side by side.

1. Triad: ``a = b + s * c`` into a variable XLA does not read gets a fresh output buffer
   every call (page faults), ``a += s * c`` updates in place. bench/optimizer_step.py's
   bound uses the second.
2. Conditional update: under ``jit_compile`` a ``tf.cond`` that may assign variables copies
   them on every step, taken or not; a while loop that runs once or not at all does not.
   Lookahead's synchronisation (radam_dist/optimizers/lookahead.py, ``_when``) uses the loop.

    .venv/bin/python bench/xla_writes.py            # about a minute, 1.6 GB of memory
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def _median_ms(step: Callable[[], None], sync: Callable[[], None], runs: int) -> float:
    step()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def triads(mib: int, runs: int) -> Dict[str, float]:
    """GB/s of the fresh-buffer and the in-place triad (12 bytes per element each)."""
    n = mib * 2**20 // 4
    a, b, c = tf.Variable(tf.zeros([n])), tf.Variable(tf.ones([n])), tf.Variable(tf.ones([n]))
    s = tf.constant(3.0)

    @tf.function(jit_compile=True)
    def fresh():
        a.assign(b + s * c)

    @tf.function(jit_compile=True)
    def in_place():
        a.assign_add(s * c)

    sync = lambda: a[:1].numpy()  # noqa: E731
    return {name: 12 * n / (_median_ms(fn, sync, runs) / 1e3) / 1e9
            for name, fn in (("a = b + s*c", fresh), ("a += s*c", in_place))}


def conditional_updates(params: int, runs: int) -> Dict[str, float]:
    """ms per step of ``var -= 1e-3 * g`` alone, and followed by a pull-back that never runs,
    behind a tf.cond or a while loop (all under jit_compile)."""
    var, slow = tf.Variable(tf.random.normal([params])), tf.Variable(tf.zeros([params]))
    grad = tf.random.normal([params])
    never = tf.Variable(False)

    def pull_back():
        value = slow + 0.5 * (var - slow)
        slow.assign(value)
        var.assign(value)

    def base():
        var.assign_sub(1e-3 * grad)

    def with_cond():
        base()

        def run():
            pull_back()
            return tf.constant(True)

        tf.cond(never, run, lambda: tf.constant(False))

    def with_loop():
        base()

        def run_once(count):
            pull_back()
            return count + 1

        trips = tf.cast(never, tf.int32)
        tf.while_loop(lambda count: count < trips, run_once, [tf.constant(0)])

    sync = lambda: var[:1].numpy()  # noqa: E731
    return {name: _median_ms(tf.function(fn, jit_compile=True), sync, runs)
            for name, fn in (("update only", base), ("+ tf.cond, not taken", with_cond),
                             ("+ while loop, 0 trips", with_loop))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--triad-mib", type=int, default=256, help="MiB per triad array")
    parser.add_argument("--params", type=int, default=50_000_000,
                        help="parameters of the conditionally updated variable")
    parser.add_argument("--runs", type=int, default=9, help="timed calls (median reported)")
    args = parser.parse_args()
    for name, gb_s in triads(args.triad_mib, args.runs).items():
        print(f"triad {name:<22} {gb_s:6.1f} GB/s")
    for name, ms in conditional_updates(args.params, args.runs).items():
        print(f"jit step {name:<22} {ms:6.1f} ms")


if __name__ == "__main__":
    main()
