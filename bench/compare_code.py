"""Benchmark: this checkout's step against another checkout's, in one run (a refactor's proof).

Why: "no step slower than before" needs both versions timed on the same machine at the same
time. Each case runs in a fresh process per code tree, the trees taking turns (A, B, A, B,
...), each turn a median of timed steps after warm-up; the ratio this / other is taken per
turn and its median reported, so load that drifts over the run hits both alike.

Cases (custom loop, ``apply_gradients`` in one tf.function; 6 steps a timed run, so that
Lookahead's sync period of 6 syncs once per run):

  plain        RectifiedAdam, no strategy, the resnet50-like shapes
  lookahead    Lookahead(RectifiedAdam), no strategy
  mirrored     RectifiedAdam under MirroredStrategy over 2 logical CPUs
  zero         RectifiedAdam(shard_optimizer_state=True) under the same strategy
  zero-ranger  Lookahead around the ZeRO-1 RectifiedAdam
  sparse       an Embedding table's IndexedSlices gradient with a dense layer, no strategy

    git archive HEAD radam_dist | tar -x -C /tmp/before    # the code before a change
    .venv/bin/python bench/compare_code.py --code /tmp/before
    .venv/bin/python bench/compare_code.py --code /tmp/before --cases zero --turns 7
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
CASES = ("plain", "lookahead", "mirrored", "zero", "zero-ranger", "sparse")
SHAPES = [(3, 3, 64, 64), (64,), (3, 3, 64, 128), (128,), (3, 3, 128, 256), (256,),
          (3, 3, 256, 512), (512,), (512, 1000), (1000,)]


def _child(case: str, steps: int, runs: int) -> None:
    """Time one case with whatever radam_dist is first on sys.path; print one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import radam_dist

    mirrored = case in ("mirrored", "zero", "zero-ranger")
    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mirrored
                else tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    shapes = [(50_000, 64), (64, 64)] if case == "sparse" else SHAPES
    with strategy.scope():
        variables = [tf.Variable(rng.standard_normal(s).astype(np.float32) * 0.01) for s in shapes]
        radam = radam_dist.RectifiedAdam(1e-3, shard_optimizer_state=case.startswith("zero"))
        optimizer = radam_dist.Lookahead(radam) if case in ("lookahead", "zero-ranger") else radam
        optimizer.build(variables)
    grads = [tf.constant(rng.standard_normal(s).astype(np.float32) * 1e-3) for s in shapes]
    if case == "sparse":
        ids = tf.constant(rng.integers(0, shapes[0][0], 512), tf.int64)
        grads[0] = tf.IndexedSlices(tf.constant(rng.standard_normal((512, 64)), tf.float32), ids,
                                    tf.constant(shapes[0], tf.int64))

    @tf.function
    def step():
        def replica():
            optimizer.apply_gradients(zip(grads, variables))
        if mirrored:
            strategy.run(replica)
        else:
            replica()

    for _ in range(3):
        step()
    optimizer.iterations.numpy()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        optimizer.iterations.numpy()
        times.append((time.perf_counter() - start) / steps)
    print(json.dumps({"case": case, "step_s": statistics.median(times),
                      "radam_dist": radam_dist.__file__}))


def _time(code: str, case: str, steps: int, runs: int) -> float:
    """One turn: a fresh process that imports radam_dist from ``code``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, __file__, "--child", case, "--code", code,
                           "--steps", str(steps), "--runs", str(runs)],
                          env=env, capture_output=True, text=True, timeout=900, cwd="/")
    if done.returncode != 0:
        raise RuntimeError(f"{case} with {code}: {done.stderr[-2000:]}")
    result = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
    if not result["radam_dist"].startswith(code):
        raise RuntimeError(f"{case}: imported {result['radam_dist']}, not the code in {code}")
    return result["step_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Time this checkout's optimizer step against another checkout's, taking "
                    "turns, and print the ratios (this / other; < 1 is faster).")
    parser.add_argument("--code", required=True, metavar="DIR",
                        help="the other checkout: a folder holding radam_dist/")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated, of " + ", ".join(CASES) + " (default: all)")
    parser.add_argument("--turns", type=int, default=5, help="turns per tree (default: 5)")
    parser.add_argument("--steps", type=int, default=6, help="steps per timed run (default: 6)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per turn (default: 5)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one timed turn, importing radam_dist from --code
        sys.path.insert(0, args.code)
        _child(args.child, args.steps, args.runs)
        return 0
    other = str(pathlib.Path(args.code).resolve())
    if not (pathlib.Path(other) / "radam_dist" / "__init__.py").is_file():
        parser.error(f"--code {args.code}: no radam_dist/__init__.py there")
    cases = [c for c in args.cases.split(",") if c]
    if set(cases) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    results: Dict[str, Dict[str, List[float]]] = {}
    print(f"this: {REPO}\nother: {other}\n")
    print("| case | this (ms) | other (ms) | this / other (median of turns) |")
    print("|---|---|---|---|")
    for case in cases:
        mine, theirs, ratios = [], [], []
        for turn in range(args.turns):
            order = [(str(REPO), mine), (other, theirs)]
            if turn % 2:
                order.reverse()
            for code, out in order:
                out.append(_time(code, case, args.steps, args.runs))
            ratios.append(mine[-1] / theirs[-1])
        results[case] = {"this_s": mine, "other_s": theirs, "ratios": ratios}
        print(f"| {case} | {statistics.median(mine) * 1e3:.2f} | "
              f"{statistics.median(theirs) * 1e3:.2f} | {statistics.median(ratios):.3f} |",
              flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
