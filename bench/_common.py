"""Shared by bench/optimizer_step.py, bench/strategy_step.py and their worker processes
(tfa's venv, torch's venv).

Only the standard library and numpy: the tfa worker runs under TensorFlow 2.15 with
numpy < 2, the torch worker without TensorFlow at all.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

Shape = Tuple[int, ...]

SEED = 20260101


def resnet50_shapes() -> List[Shape]:
    """ResNet-50's trainable variables: conv kernels, batch-norm gamma/beta, the classifier
    (161 variables, 25.5M parameters; convolutions without bias, as in the Keras model)."""
    shapes: List[Shape] = [(7, 7, 3, 64), (64,), (64,)]
    in_ch = 64
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for block in range(blocks):
            out_ch = 4 * width
            for kernel in ((1, 1, in_ch, width), (3, 3, width, width), (1, 1, width, out_ch)):
                shapes += [kernel, (kernel[-1],), (kernel[-1],)]
            if block == 0:
                shapes += [(1, 1, in_ch, out_ch), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(2048, 1000), (1000,)]
    return shapes


def transformer_shapes() -> List[Shape]:
    """A 100M-parameter decoder in few large tensors: a 24,576 x 1,024 embedding and six
    blocks of attention (4 x 1024^2) and MLP (1024 x 4096 twice) weights, plus norms."""
    d, ff = 1024, 4096
    shapes: List[Shape] = [(24576, d)]
    for _ in range(6):
        shapes += [(d, d)] * 4 + [(d, ff), (ff, d), (d,), (d,)]
    return shapes


def small_shapes() -> List[Shape]:
    """1,000 small variables (dispatch overhead dominates): biases and 32 x 32 kernels."""
    return [(64,) if i % 2 else (32, 32) for i in range(1000)]


def large_shapes() -> List[Shape]:
    """Four 3,400 x 1,000 tensors, 13.6M parameters: few large tensors at a size two
    replicas' copies (and three optimizers' slots) fit on a small machine (issue 13's set)."""
    return [(3400, 1000)] * 4


SHAPE_SETS: Dict[str, Callable[[], List[Shape]]] = {
    "resnet50": resnet50_shapes,
    "transformer": transformer_shapes,
    "small": small_shapes,
    "large": large_shapes,
}


def parameter_count(shapes: Sequence[Shape]) -> int:
    return int(sum(int(np.prod(s)) for s in shapes))


def make_arrays(shapes: Sequence[Shape], seed: int = SEED):
    """Initial values and one gradient per variable, float32, identical in every process."""
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2) for s in shapes]
    return values, grads


def rotated(names: List[str], turn: int) -> List[str]:
    """The turn's order: each candidate starts a turn in its turn, so none always runs in
    the same place (in a fixed order, identical code ran 7% slower in second place than in
    third: bench/fused_order.py, small set, jit_compile, on the 2-core development VM)."""
    shift = turn % len(names) if names else 0
    return names[shift:] + names[:shift]


def time_runs(step: Callable[[], None], sync: Callable[[], None], steps: int, runs: int,
              warmup: int = 2) -> List[float]:
    """Seconds per step of ``runs`` runs of ``steps`` steps each, after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    sync()
    per_step = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def summary(times: Sequence[float]) -> Dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
    }


def emit(result: dict) -> None:
    """Workers print one JSON line, prefixed so it stands out of library noise."""
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def parse_emitted(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise ValueError("worker printed no BENCH_RESULT line")
