"""The optimizer step and model.fit under tf.distribute: radam_dist against Keras 3 Adam.

Three parts, each against Keras 3 Adam (the anchor) in the same run, candidates taking
turns (each turn starting with the next one), medians of the runs and ratios:

  mirrored  MirroredStrategy over 2 logical CPU devices in one process;
  mwms      MultiWorkerMirroredStrategy over two worker processes on loopback (TF_CONFIG,
            free ports);
  fit       model.fit under MWMS x2 on an Embedding + Dense model (synthetic data, fixed
            steps_per_epoch), a callback timing each batch.

In mirrored and mwms every optimizer updates the same mirrored variables with the same
gradients: ``apply_gradients`` (the cross-replica sum included) inside ``strategy.run`` in
one tf.function. The per-variable rows (``RADAM_DIST_FUSED=0``, the path radam_dist took under
a strategy before issue 13) show what the fused path changes; ``--no-per-variable`` drops them.
The ``(XLA chunks, RADAM_DIST_NATIVE=0)`` row is RectifiedAdam's fused path without the
one-pass CPU kernel (``radam_dist/native``): the three XLA loops per tensor it replaces.

The bound (large-tensor set): a step moves 28 bytes per float32 parameter (read var, grad, m,
v; write var, m, v) on each replica's copy, so 2 x parameters x 28 bytes, divided by the
memory bandwidth of an XLA-compiled in-place triad (bench/optimizer_step.py) measured in
every turn among the candidates (mirrored: one process; mwms: both workers' triads at the
same time, summed). Under MWMS Keras Adam pays Keras' all-reduce (the first floor row) and
radam_dist's rows their own, which all-reduces large gradients one by one
(``gradient_sums.all_reduce_large_apart``, the second floor row); under a single-process
MirroredStrategy RectifiedAdam sums the gradients inside its own update
(``StepPlan.sums_in_graph``), so there its ``minus all-reduce`` column subtracts a cost
it does not pay: read ``vs bound``.

    .venv/bin/python bench/strategy_step.py --quick           # resnet50 + large, 3 turns
    .venv/bin/python bench/strategy_step.py --json out/bench/strategy_step.json
    .venv/bin/python bench/strategy_step.py --parts fit --runs 7
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "_strategy_worker.py"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _common import SHAPE_SETS, parse_emitted  # noqa: E402

logger = logging.getLogger("bench.strategy_step")

ADAM = "Keras 3 Adam"
FLOOR = "floor: the gradients' all-reduce alone"  # as in _strategy_worker.py
SPLIT_FLOOR = "floor: radam_dist's all-reduce alone (large gradients one by one)"
FLOORS = (FLOOR, SPLIT_FLOOR)
PARTS = ("mirrored", "mwms", "fit")
# issue 13's targets: (ratio to Keras Adam) by optimizer on resnet50 / transformer, and
# the ratio to the bound on the large-tensor set.
ADAM_TARGETS = {"RectifiedAdam": 1.0, "Lookahead(RectifiedAdam)": 1.1}
BOUND_TARGET = 1.5
BOUND_SETS = ("large",)
ADAM_TARGET_SETS = ("resnet50", "transformer")
FIT_TARGET = 1.0


# -- running the workers --------------------------------------------------------------------
CODE: Optional[str] = None  # --code: the radam_dist checkout the workers import


def _env() -> Dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    if CODE:
        env["PYTHONPATH"] = os.pathsep.join([CODE] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("TF_CONFIG", None)
    env.pop("RADAM_DIST_FUSED", None)  # the worker sets it per row
    return env


def run_workers(worker_args: Sequence[str], workers: int, timeout: float) -> List[dict]:
    """Run the worker once (mirrored) or as an MWMS cluster of ``workers`` processes, each
    in its own process group (all killed on a failure or after ``timeout`` seconds), its
    output in a file (a pipe left unread could stall a worker, and with it the cluster)."""
    command = [sys.executable, str(WORKER), *worker_args]
    envs = [_env()]
    if workers > 1:
        from radam_dist.launch.cluster import local_cluster_spec, tf_config

        cluster = local_cluster_spec(workers)
        envs = [dict(_env(), TF_CONFIG=tf_config(cluster, "worker", i)) for i in range(workers)]
    logs = [tempfile.TemporaryFile("w+") for _ in envs]
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for env, log in zip(envs, logs)]
    deadline = time.monotonic() + timeout
    try:
        while any(proc.poll() is None for proc in procs):
            if any(proc.poll() not in (None, 0) for proc in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise RuntimeError(f"worker {i} exited {proc.returncode} (-9: killed after a "
                               f"failure or the {timeout:.0f} s timeout):\n{out[-4000:]}")
    return [parse_emitted(out) for out in outputs]


# -- summarising ------------------------------------------------------------------------------
def _paired(times: Sequence[float], anchor: Sequence[float]) -> float:
    """Median over turns of this row's run / the anchor's run of the same turn."""
    return statistics.median(a / b for a, b in zip(times, anchor))


def step_table(results: List[dict]) -> Dict[str, dict]:
    """Per shape set: medians, ratios to Adam and to the bound, from worker 0's times and
    every worker's triad (summed per turn: the workers measure it at the same time)."""
    first = results[0]
    replicas = first["replicas"]
    sets = {}
    for shape_set, entry in first["sets"].items():
        turns = zip(*(r["sets"][shape_set]["triad_b_s"] for r in results))
        bandwidth = statistics.median(sum(turn) for turn in turns)
        bound_s = replicas * 28 * entry["parameters"] / bandwidth
        anchor = entry["per_run_s"][ADAM]
        floor = statistics.median(entry["per_run_s"].get(FLOOR, [0.0]))
        # MWMS: radam_dist's rows pay their own all-reduce (gradient_sums.all_reduce_large_apart)
        own_floor = statistics.median(entry["per_run_s"].get(SPLIT_FLOOR, [floor]))
        rows = {}
        for name, times in entry["per_run_s"].items():
            median = statistics.median(times)
            paid = floor if name == ADAM else own_floor
            rows[name] = {"median_s": median, "min_s": min(times), "per_run_s": times,
                          "vs_adam": median / statistics.median(anchor),
                          "vs_adam_paired": _paired(times, anchor),
                          "vs_bound": median / bound_s,
                          "update_vs_bound": (median - paid) / bound_s}
        sets[shape_set] = {"variables": entry["variables"], "parameters": entry["parameters"],
                           "bandwidth_gb_s": bandwidth / 1e9, "bound_s": bound_s, "rows": rows}
    return {"replicas": replicas, "workers": len(results), "sets": sets}


def fit_table(results: List[dict]) -> dict:
    first = results[0]
    anchor = first["steps_s"][ADAM]
    rows = {}
    for name, times in first["steps_s"].items():
        median = statistics.median(times)
        rows[name] = {"median_s": median, "steps": len(times),
                      "vs_adam": median / statistics.median(anchor)}
    return {key: first[key] for key in ("replicas", "parameters", "vocab", "embed_dim",
                                        "hidden", "global_batch")} | {"rows": rows}


def _target(name: str, shape_set: str) -> Optional[float]:
    base = name.split(" (per-variable")[0]
    if name != base or shape_set not in ADAM_TARGET_SETS:
        return None
    return ADAM_TARGETS.get(base)


def _mark(value: float, target: Optional[float]) -> str:
    if target is None:
        return f"{value:.2f}x"
    return f"{value:.2f}x (<= {target:.1f}: {'met' if value <= target else 'NOT met'})"


def _plain(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}x"


def markdown_steps(title: str, table: dict) -> str:
    lines = [f"\n**{title}** ({table['replicas']} replicas, {table['workers']} process(es)); "
             "median (min) ms per step of the runs; `paired`: median over turns of the run "
             "divided by Adam's run of the same turn. Bound = "
             f"{table['replicas']} copies x parameters x 28 bytes / triad bandwidth (XLA, "
             "in place, measured in every turn); `minus all-reduce`: (step - floor) / bound, "
             "the update's own time against the bound (Keras Adam: Keras' floor; radam_dist's "
             "rows under MWMS: its own, large gradients one by one). Where a floor alone "
             "exceeds 1.5x the bound, the wire, not the update, keeps the step off that "
             "target.\n",
             "| shape set | optimizer | ms per step | vs Keras 3 Adam | paired | vs bound "
             "| minus all-reduce, vs bound |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape_set, entry in table["sets"].items():
        label = (f"{shape_set} ({entry['variables']} tensors, {entry['parameters'] / 1e6:.1f}M; "
                 f"bound {1e3 * entry['bound_s']:.1f} ms at {entry['bandwidth_gb_s']:.1f} GB/s)")
        for name, row in entry["rows"].items():
            bound_target = (BOUND_TARGET if shape_set in BOUND_SETS and name == "RectifiedAdam"
                            else None)
            ratio = "–" if name == ADAM else _mark(row["vs_adam"], _target(name, shape_set))
            paired = "–" if name == ADAM else f"{row['vs_adam_paired']:.2f}x"
            lines.append(f"| {label} | {name} | {1e3 * row['median_s']:.1f} "
                         f"({1e3 * row['min_s']:.1f}) | {ratio} | {paired} | "
                         f"{_mark(row['vs_bound'], bound_target)} | "
                         f"{_plain(None if name in FLOORS else row.get('update_vs_bound'))} |")
            label = ""
    notes = []
    for shape_set, entry in table["sets"].items():
        floors = [entry["rows"][f]["vs_bound"] for f in FLOORS if f in entry["rows"]]
        if shape_set in BOUND_SETS and floors and min(floors) > BOUND_TARGET:
            notes.append(f"\n{shape_set}: the all-reduce alone takes {min(floors):.2f}x the "
                         f"bound (> {BOUND_TARGET}): over this wire no optimizer can meet the "
                         "bound target; `minus all-reduce` is the update's own share.")
    return "\n".join(lines) + "\n" + "".join(n + "\n" for n in notes)


def markdown_fit(table: dict) -> str:
    lines = [f"\n**model.fit under MWMS x{table['replicas']}**: Embedding {table['vocab']:,} x "
             f"{table['embed_dim']} (sparse gradients), Flatten, 2 x Dense {table['hidden']} "
             f"relu, Dense 1; {table['parameters']:,} parameters, global batch "
             f"{table['global_batch']}; median ms per batch after the warm-up.\n",
             "| optimizer | ms per step | steps timed | vs Keras 3 Adam |", "|---|---:|---:|---:|"]
    for name, row in table["rows"].items():
        target = FIT_TARGET if name == "RectifiedAdam" else None
        ratio = "–" if name == ADAM else _mark(row["vs_adam"], target)
        lines.append(f"| {name} | {1e3 * row['median_s']:.1f} | {row['steps']} | {ratio} |")
    return "\n".join(lines) + "\n"


def render(report: dict) -> str:
    """The markdown tables of every part in ``report``, and how loaded the machine was."""
    text = [f"{report['date']}; `{report['command']}`; radam_dist from {report['code']}\n"]
    titles = {"mirrored": "MirroredStrategy, 2 logical CPU devices, one process",
              "mwms": "MultiWorkerMirroredStrategy, 2 worker processes on loopback"}
    for part in PARTS:
        if part in report:
            text.append(markdown_fit(report[part]) if part == "fit"
                        else markdown_steps(titles[part], report[part]))
    text.append(f"\nload average (1 min) before {report['load_before'][0]:.2f}, after "
                f"{report['load_after'][0]:.2f}, on {os.cpu_count()} cores\n")
    return "".join(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time radam_dist's optimizer step and model.fit under MirroredStrategy "
                    "and MultiWorkerMirroredStrategy against Keras 3 Adam (issue 13).",
        epilog="Each run prints a markdown table; the targets are printed next to the ratios.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated parts to run: " + ", ".join(PARTS)
                        + " (default: all)")
    parser.add_argument("--sets", default="resnet50,transformer,large",
                        help="shape sets for mirrored and mwms, of " + ", ".join(SHAPE_SETS)
                        + " (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5,
                        help="timed turns; medians of these (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6,
                        help="steps per timed run (a multiple of Lookahead's sync period, 6, "
                        "times its sync fairly; default: %(default)s)")
    parser.add_argument("--fit-steps", type=int, default=20,
                        help="steps per fit turn (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=50000,
                        help="fit: rows of the Embedding (default: %(default)s)")
    parser.add_argument("--no-per-variable", action="store_true",
                        help="leave out the RADAM_DIST_FUSED=0 rows")
    parser.add_argument("--quick", action="store_true",
                        help="resnet50 and large only, 3 turns, 10 fit steps (5 minutes on the "
                        "quiet 2-core development VM, 14 at load 5-9)")
    parser.add_argument("--code", default="", metavar="DIR",
                        help="import radam_dist from DIR (e.g. `git archive HEAD radam_dist | "
                        "tar -x -C DIR`: the code before a change) instead of this checkout")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds per part before its workers are killed "
                        "(default: %(default)s)")
    parser.add_argument("--json", default="", help="also write everything measured here")
    parser.add_argument("--render", default="", metavar="JSON",
                        help="measure nothing: print the tables of a file --json wrote")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render:
        sys.stdout.write(render(json.loads(pathlib.Path(args.render).read_text())))
        return 0
    if args.quick:
        args.sets, args.runs, args.fit_steps = "resnet50,large", 3, 10
    global CODE
    if args.code:
        if not (pathlib.Path(args.code) / "radam_dist" / "__init__.py").is_file():
            parser.error(f"--code {args.code}: no radam_dist/__init__.py there")
        CODE = str(pathlib.Path(args.code).resolve())
    parts = [p for p in args.parts.split(",") if p]
    sets = [s for s in args.sets.split(",") if s]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    if set(sets) - set(SHAPE_SETS):
        parser.error(f"--sets: choose from {', '.join(SHAPE_SETS)}")
    if args.runs < 1 or args.steps < 1 or args.fit_steps < 3:
        parser.error("--runs and --steps must be >= 1, --fit-steps >= 3")
    common = ["--runs", str(args.runs)] + ([] if args.no_per_variable else ["--per-variable"])
    step_args = ["step", "--sets", ",".join(sets), "--steps", str(args.steps), *common]
    report: Dict = {"command": " ".join([sys.executable] + sys.argv),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "load_before": os.getloadavg(), "code": CODE or str(REPO)}
    for part in parts:
        start = time.perf_counter()
        logger.info("%s ...", part)
        if part == "mirrored":
            table = step_table(run_workers(step_args + ["--strategy", "mirrored"], 1, args.timeout))
        elif part == "mwms":
            table = step_table(run_workers(step_args + ["--strategy", "mwms"], 2, args.timeout))
        else:
            table = fit_table(run_workers(
                ["fit", "--strategy", "mwms", "--fit-steps", str(args.fit_steps),
                 "--vocab", str(args.vocab), *common], 2, args.timeout))
        table["seconds"] = time.perf_counter() - start
        report[part] = table
        logger.info("%s done in %.0f s", part, table["seconds"])
    report["load_after"] = os.getloadavg()
    sys.stdout.write(render(report))
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
