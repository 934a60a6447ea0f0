"""How long one optimizer step takes, against Keras' Adam, tfa's RAdam, torch and the memory.

An optimizer step is memory traffic: per float32 parameter RAdam reads the variable, the
gradient, m and v and writes the variable, m and v (28 bytes). This benchmark times, on the
same variables and gradients and in one process, radam_dist's RectifiedAdam (its fused XLA
path and, as the "before" anchor, the plain per-variable path with RADAM_DIST_FUSED=0) and
Lookahead(RectifiedAdam), Keras 3's Adam and tf_keras' legacy Adam (the fused
ResourceApplyAdam kernel), each eagerly, in tf.function and in tf.function(jit_compile=True);
then tensorflow-addons 0.23's RectifiedAdam (TF 2.15, its own venv) and torch.optim.RAdam
(foreach) in their own processes on the same shapes; and divides the bytes a step must move
by the bandwidth of a STREAM-like triad, compiled by XLA and writing in place, timed in
every turn among the candidates (the bound: load on a shared machine moves it). A last row, the
floor, makes the three writes of a step with no arithmetic: what the harness itself costs.

Reports medians of --runs runs (each --steps steps) and the ratios the targets are about.

    make bench                       # all shape sets, writes out/bench/optimizer_step.*
    .venv/bin/python bench/optimizer_step.py --sets resnet50 --tfa-python /tmp/tfa-venv/bin/python
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    SHAPE_SETS,
    make_arrays,
    parameter_count,
    parse_emitted,
    rotated,
    summary,
    time_runs,
)

logger = logging.getLogger("bench.optimizer_step")

MODES = ("eager", "function", "jit_compile")
TFA_VENV = REPO / ".venv-tfa"
TORCH_VENV = REPO / ".venv-bench-torch"
TFA_PINS = ["-r", str(REPO / "requirements-tfa.txt")]  # the pins `make tfa-reference` uses
TORCH_PINS = ["torch==2.13.0", "numpy<3"]


# -- the memory-bandwidth bound -------------------------------------------------------------
def numpy_triad(mib: int, threads: int, repeats: int = 5) -> float:
    """Bytes per second of a = b + s * c (float32 arrays of ``mib`` MiB), numpy, ``threads``
    threads over cache-sized chunks (numpy releases the GIL). STREAM's count: 12 bytes per
    element (read b, read c, write a); the best of ``repeats``."""
    n = mib * 2**20 // 4
    a = np.zeros(n, np.float32)
    b = np.ones(n, np.float32)
    c = np.full(n, 2.0, np.float32)
    scalar = np.float32(3.0)
    chunk = 1 << 16

    def work(lo: int, hi: int) -> None:
        tmp = np.empty(chunk, np.float32)
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            t = tmp[: stop - start]
            np.multiply(c[start:stop], scalar, out=t)
            np.add(b[start:stop], t, out=a[start:stop])

    bounds = np.linspace(0, n, threads + 1).astype(int)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=work, args=(int(bounds[i]), int(bounds[i + 1])))
                   for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, 12 * n / (time.perf_counter() - start))
    assert float(a[n // 2]) == 7.0
    return best


class XlaTriad:
    """``a += s * c`` on TF variables, compiled by XLA (the code generator the optimizers'
    fast path uses): 12 bytes per element (read a, read c, write a), written in place as an
    optimizer writes its variables. (``a = b + s * c`` into a variable XLA does not read gets
    a fresh output buffer every call, and its page faults cost a third of the bandwidth: 34
    against 50 GB/s on the development VM, bench/xla_writes.py.)"""

    def __init__(self, mib: int):
        import tensorflow as tf

        self.n = mib * 2**20 // 4
        self.a = tf.Variable(tf.zeros([self.n]))
        c = tf.Variable(tf.fill([self.n], 2.0))
        scalar = tf.constant(3.0)

        @tf.function(jit_compile=True)
        def step():  # returns nothing: returning a would copy it once more
            self.a.assign_add(scalar * c)

        self._step = step
        self._calls = 0
        self.bandwidth(repeats=1)  # compile, touch the memory

    def bandwidth(self, repeats: int) -> float:
        """Bytes per second, the best of ``repeats`` calls."""
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            self._step()
            middle = float(self.a[self.n // 2].numpy())
            best = max(best, 12 * self.n / (time.perf_counter() - start))
            self._calls += 1
            assert middle == 6.0 * self._calls, (middle, self._calls)
        return best


def triad_bandwidth(triad: XlaTriad, mib: int, threads: int) -> Dict[str, float]:
    """The STREAM-like triad both ways, at the start of the run."""
    return {"numpy_triad": numpy_triad(mib, threads), "xla_triad": triad.bandwidth(5)}


# -- candidates in this process ---------------------------------------------------------------
class WritesOnlyFloor:
    """Not an optimizer: per variable ``m = g; v = g; var -= g`` and no arithmetic.

    The three writes every Adam-family step makes, with the same captured variables, slots
    and gradients. With per-variable slots no optimizer does less per step, so where this
    row is slow the harness (TF's function call, one kernel or argument per variable) is
    the limit, and ``tfa / floor`` is the most any optimizer could gain over tfa there.
    """

    def build(self, variables) -> None:
        import tensorflow as tf

        self._slots = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v)))
                       for v in variables]

    def apply_gradients(self, grads_and_vars) -> None:
        for (grad, var), (m, v) in zip(grads_and_vars, self._slots):
            m.assign(grad)
            v.assign(grad)
            var.assign_sub(grad)


FLOOR = "floor: m = g; v = g; var -= g (no arithmetic)"


def _candidates():
    import keras
    import tf_keras

    import radam_dist

    return {
        "RectifiedAdam (plain, per-variable)": dict(
            make=lambda: radam_dist.RectifiedAdam(learning_rate=1e-3), fused=False,
            modes=("eager", "function")),
        "RectifiedAdam": dict(make=lambda: radam_dist.RectifiedAdam(learning_rate=1e-3)),
        # The fused path without the one-pass CPU kernel (radam_dist/native): its XLA chunks.
        "RectifiedAdam (XLA chunks, RADAM_DIST_NATIVE=0)": dict(
            make=lambda: radam_dist.RectifiedAdam(learning_rate=1e-3), native=False,
            modes=("eager", "function")),
        "Lookahead(RectifiedAdam)": dict(
            make=lambda: radam_dist.Lookahead(radam_dist.RectifiedAdam(learning_rate=1e-3))),
        "Keras 3 Adam": dict(make=lambda: keras.optimizers.Adam(learning_rate=1e-3)),
        "tf_keras legacy Adam (ResourceApplyAdam)": dict(
            make=lambda: tf_keras.optimizers.legacy.Adam(learning_rate=1e-3), legacy=True),
        FLOOR: dict(make=WritesOnlyFloor),
    }


def time_in_process(shape_set: str, steps: int, runs: int, only: Optional[List[str]],
                    triad: XlaTriad) -> Tuple[Dict, List[float]]:
    """Seconds per step of every in-process candidate, mode by mode, and the triad's
    bandwidth (bytes per second) measured in every turn.

    Within a mode the candidates take turns (run 1 of each, then run 2 of each, ..., each
    turn starting with the next candidate), and the triad takes its turn with them, so the
    load of a shared machine falls on all of them alike, the bound included.
    """
    import tensorflow as tf

    values, grads = make_arrays(SHAPE_SETS[shape_set]())
    variables = [tf.Variable(v) for v in values]
    grads = [tf.constant(g) for g in grads]
    del values
    candidates = {name: spec for name, spec in _candidates().items()
                  if not only or any(key.lower() in name.lower() for key in only)}
    sync = lambda: variables[-1].numpy()  # noqa: E731
    results: Dict[str, Dict] = {name: {} for name in candidates}
    bandwidths: List[float] = []
    for mode in MODES:
        steps_by_name: Dict[str, Callable[[], None]] = {}
        switch: Dict[str, str] = {}
        for name, spec in candidates.items():
            if mode not in spec.get("modes", MODES):
                continue
            # Read at every eager step, and when a tf.function traces (its first call).
            switch[name] = {"RADAM_DIST_FUSED": "1" if spec.get("fused", True) else "0",
                            "RADAM_DIST_NATIVE": "1" if spec.get("native", True) else "0"}
            os.environ.update(switch[name])
            optimizer = spec["make"]()
            if spec.get("legacy"):
                optimizer._create_all_weights(variables)
            else:
                optimizer.build(variables)

            def step(optimizer=optimizer):
                optimizer.apply_gradients(zip(grads, variables))

            if mode == "function":
                step = tf.function(step)
            elif mode == "jit_compile":
                step = tf.function(step, jit_compile=True)
            time_runs(step, sync, steps=0, runs=0, warmup=2)  # trace, compile, touch memory
            steps_by_name[name] = step
        times: Dict[str, List[float]] = {name: [] for name in steps_by_name}
        for turn in range(runs):
            for name in rotated(list(steps_by_name), turn):
                os.environ.update(switch[name])
                times[name] += time_runs(steps_by_name[name], sync, steps, runs=1, warmup=0)
            bandwidths.append(triad.bandwidth(repeats=3))
        for variable in ("RADAM_DIST_FUSED", "RADAM_DIST_NATIVE"):
            os.environ.pop(variable, None)
        for name, per_step in times.items():
            results[name][mode] = dict(summary(per_step), per_run_s=per_step)  # in turn order
            logger.info("%s %s %s: %.2f ms (min %.2f)", shape_set, name, mode,
                        1e3 * results[name][mode]["median_s"], 1e3 * min(per_step))
        steps_by_name.clear()
        step = optimizer = None  # noqa: F841  (free this mode's slots before the next)
        gc.collect()
    return {name: modes for name, modes in results.items() if modes}, bandwidths


# -- candidates in their own processes ------------------------------------------------------
def ensure_venv(venv: pathlib.Path, pins: List[str]) -> pathlib.Path:
    """The interpreter of ``venv``, created with ``pins`` on first use (python3.11)."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    if not stamp.exists():
        logger.info("creating %s with %s (first run only)", venv, " ".join(pins))
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
        stamp.touch()
    return python


def run_worker(python: str, worker: str, shape_set: str, steps: int, runs: int,
               extra: List[str]) -> Dict:
    command = [python, str(HERE / worker), shape_set, "--steps", str(steps), "--runs", str(runs),
               *extra]
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{worker} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return parse_emitted(done.stdout)


# -- report ---------------------------------------------------------------------------------
def ratios(entry: Dict) -> Dict[str, Dict[str, float]]:
    """The targets: RAdam / Keras Adam (<= 1; also paired: the median over turns of the two
    runs taken one after the other), tfa / RAdam (>= 3), RAdam / bound (<= 1.5); and what
    the floor allows: tfa / floor, RAdam / floor."""
    ours = entry["results"].get("RectifiedAdam", {})
    adam = entry["results"].get("Keras 3 Adam", {})
    tfa = entry["results"].get("tfa 0.23 RectifiedAdam (TF 2.15)", {})
    floor = entry["results"].get(FLOOR, {})
    out: Dict[str, Dict[str, float]] = {}
    for mode, timing in ours.items():
        t = timing["median_s"]
        row = {"vs_bound": t / entry["bound_s"]}
        if mode in adam:
            row["vs_keras_adam"] = t / adam[mode]["median_s"]
            if "per_run_s" in timing and "per_run_s" in adam[mode]:  # run i of both: one turn
                row["vs_keras_adam_paired"] = statistics.median(
                    a / b for a, b in zip(timing["per_run_s"], adam[mode]["per_run_s"]))
        if mode in tfa:
            row["tfa_speedup"] = tfa[mode]["median_s"] / t
        if mode in floor:
            row["vs_floor"] = t / floor[mode]["median_s"]
            if mode in tfa:
                row["tfa_over_floor"] = tfa[mode]["median_s"] / floor[mode]["median_s"]
        out[mode] = row
    return out


def _ratio(row: Dict[str, float], key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}x" if key in row else "–"


def markdown(report: Dict) -> str:
    lines = []
    for shape_set, entry in report["sets"].items():
        lines.append(
            f"\n**{shape_set}**: {entry['variables']} variables, {entry['parameters'] / 1e6:.1f}M "
            f"parameters; bound = {entry['bytes_per_step'] / 1e6:.0f} MB / "
            f"{entry['triad_gb_s']:.1f} GB/s = **{1e3 * entry['bound_s']:.1f} ms**\n")
        lines.append("| optimizer: median (min) ms per step | eager | tf.function | jit_compile |")
        lines.append("|---|---:|---:|---:|")
        for name, modes in entry["results"].items():
            cells = []
            for mode in MODES:
                timing = modes.get(mode) or (modes.get("foreach") if mode == "eager" else None)
                cells.append(f"{1e3 * timing['median_s']:.1f} ({1e3 * timing['min_s']:.1f})"
                             if timing else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("| RectifiedAdam | vs Keras 3 Adam (target <= 1.0) | paired | tfa / ours "
                     "(target >= 3) | vs bound (target <= 1.5) | vs floor "
                     "| tfa / floor (most possible) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for mode, row in entry["ratios"].items():
            columns = (("vs_keras_adam", 2), ("vs_keras_adam_paired", 2), ("tfa_speedup", 1),
                       ("vs_bound", 2), ("vs_floor", 2), ("tfa_over_floor", 1))
            cells = [_ratio(row, key, digits) for key, digits in columns]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (for the axis formatter)

    sets = list(report["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 6.5), squeeze=False)
    for ax, shape_set in zip(axes[0], sets):
        entry = report["sets"][shape_set]
        labels, values, colors = [], [], []
        palette = {"eager": "#9ecae1", "function": "#3182bd", "jit_compile": "#08519c",
                   "foreach": "#fd8d3c"}
        for name, modes in entry["results"].items():
            for mode, timing in modes.items():
                labels.append(f"{name} [{mode}]")
                values.append(1e3 * timing["median_s"])
                colors.append(palette.get(mode, "#999999"))
        y = np.arange(len(labels))
        ax.barh(y, values, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        low = min(min(values), 1e3 * entry["bound_s"]) / 2
        ax.set_xlim(low, max(values) * 3)
        for i, value in enumerate(values):
            ax.text(value * 1.05, i, f"{value:.1f}", va="center", fontsize=7)
        ax.axvline(1e3 * entry["bound_s"], color="red", linestyle="--",
                   label=f"bandwidth bound {1e3 * entry['bound_s']:.1f} ms")
        ax.set_xlabel("ms per step (median, log scale)")
        ax.set_title(f"{shape_set}: {entry['variables']} vars, {entry['parameters'] / 1e6:.1f}M params")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"One optimizer step, float32, {report['machine']['cpu']} "
                 f"({report['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> Dict:
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
            "python": platform.python_version()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time one optimizer step of radam_dist against Keras Adam, tfa, torch and "
                    "the memory-bandwidth bound.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sets", default="resnet50,small,transformer",
                        help="comma-separated shape sets: " + ", ".join(SHAPE_SETS))
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--steps", type=int, default=6, help="steps per timed run (a "
                        "multiple of Lookahead's sync period, 6, times its sync fairly)")
    parser.add_argument("--only", default="", help="comma-separated substrings of in-process "
                        "optimizer names to time; empty: all")
    parser.add_argument("--tfa-python", default="", help="interpreter with TF 2.15 + tfa 0.23; empty: "
                        f"{TFA_VENV.name}/, created on first use")
    parser.add_argument("--torch-python", default="", help="interpreter with torch 2.13; empty: "
                        f"{TORCH_VENV.name}/, created on first use")
    parser.add_argument("--no-tfa", action="store_true", help="skip tensorflow-addons")
    parser.add_argument("--no-torch", action="store_true", help="skip torch")
    parser.add_argument("--triad-mib", type=int, default=256, help="MiB per triad array")
    parser.add_argument("--out", default=str(REPO / "out" / "bench"),
                        help="folder for optimizer_step.json / .md / .png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.runs < 1 or args.steps < 1:
        parser.error("--runs and --steps must be >= 1")
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in SHAPE_SETS]
    if unknown:
        parser.error(f"unknown shape set(s) {unknown}; choose from {sorted(SHAPE_SETS)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    triad = XlaTriad(args.triad_mib)
    triads = triad_bandwidth(triad, args.triad_mib, threads=os.cpu_count() or 1)
    logger.info("triad bandwidth at the start: %s",
                {k: f"{v / 1e9:.1f} GB/s" for k, v in triads.items()})
    tfa_python = None if args.no_tfa else (args.tfa_python or str(ensure_venv(TFA_VENV, TFA_PINS)))
    torch_python = None if args.no_torch else (
        args.torch_python or str(ensure_venv(TORCH_VENV, TORCH_PINS)))
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None

    report = {"machine": machine(), "triads_at_start_gb_s": {k: v / 1e9 for k, v in triads.items()},
              "runs": args.runs, "steps": args.steps,
              "command": " ".join([sys.executable] + sys.argv), "sets": {}}
    import tensorflow as tf

    report["machine"]["tensorflow"] = tf.__version__
    for shape_set in sets:
        shapes = SHAPE_SETS[shape_set]()
        params = parameter_count(shapes)
        entry = {"variables": len(shapes), "parameters": params, "bytes_per_step": 28 * params}
        entry["results"], bandwidths = time_in_process(
            shape_set, args.steps, args.runs, only, triad)
        # The bound: the median of the triad's turns, taken among the candidates' runs.
        bandwidth = statistics.median(bandwidths)
        entry["triad_gb_s"] = bandwidth / 1e9
        entry["triad_turns_gb_s"] = [b / 1e9 for b in bandwidths]
        entry["bound_s"] = 28 * params / bandwidth
        logger.info("%s: triad %.1f GB/s (median of %d turns), bound %.1f ms", shape_set,
                    bandwidth / 1e9, len(bandwidths), 1e3 * entry["bound_s"])
        gc.collect()
        if tfa_python:
            tfa = run_worker(tfa_python, "_tfa_worker.py", shape_set, args.steps, args.runs, [])
            entry["results"]["tfa 0.23 RectifiedAdam (TF 2.15)"] = tfa["modes"]
        if torch_python:
            torch = run_worker(torch_python, "_torch_worker.py", shape_set, args.steps, args.runs,
                               ["--threads", str(os.cpu_count() or 1)])
            entry["results"][f"torch {torch['torch']} RAdam (foreach)"] = torch["modes"]
        entry["ratios"] = ratios(entry)
        report["sets"][shape_set] = entry
        (out / "optimizer_step.json").write_text(json.dumps(report, indent=2))

    table = markdown(report)
    (out / "optimizer_step.md").write_text(table)
    plot(report, out / "optimizer_step.png")
    sys.stdout.write(table)
    logger.info("wrote %s", ", ".join(str(out / f"optimizer_step.{e}") for e in ("json", "md", "png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
