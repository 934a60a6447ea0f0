"""`make demo`'s distributed part: the same model on two replicas (MirroredStrategy over two
logical CPUs) and on a two-worker MWMS cluster (two processes on loopback, started like
``radam-dist launch``), each compared with the one-device run of the same global batches.

    python -m examples.distribute.demo [OUT_DIR]
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
from typing import List

import numpy as np

from radam_dist.launch import LocalCluster

log = logging.getLogger(__name__)

# float32 agreement with the one-device trajectory (summation order only), see DISTRIBUTE.md
RTOL, ATOL = 1e-5, 1e-6
# run by path: the tasks need no particular working directory
_SCRIPT = [sys.executable, str(pathlib.Path(__file__).resolve().with_name("train.py"))]


def _env():
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _compare(result: dict) -> dict:
    reference, distributed = result["reference"], result["distributed"]
    worst, ok = 0.0, len(reference) == len(distributed) > 0
    for ref_step, dist_step in zip(reference, distributed):
        for ref, dist in zip(ref_step, dist_step):
            ref, dist = np.asarray(ref), np.asarray(dist)
            worst = max(worst, float(np.abs(dist - ref).max()))
            ok = ok and bool(np.allclose(dist, ref, rtol=RTOL, atol=ATOL))
    return {"steps": len(distributed), "max_abs_diff": worst, "match": ok}


def _line(label: str, outcome: dict, seconds: float) -> str:
    if "error" in outcome:
        return f"distribute: {label}: FAILED ({outcome['error']})"
    verdict = "MATCHES" if outcome["match"] else "DOES NOT MATCH"
    return (f"distribute: {label}: {verdict} the single-device run "
            f"(max |w - w_1dev| = {outcome['max_abs_diff']:.2e} over {outcome['steps']} steps, "
            f"tolerance rtol={RTOL:g} atol={ATOL:g}; {seconds:.0f} s)")


def run(out_dir: str) -> List[str]:
    """Run both comparisons, write ``distribute_demo.json`` in ``out_dir``, return lines."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}

    start = time.monotonic()
    mirrored_json = out / "distribute_mirrored.json"
    proc = subprocess.run(_SCRIPT + ["--strategy", "mirrored", "--out", str(mirrored_json)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    runs["mirrored"] = (_compare(json.loads(mirrored_json.read_text())) if proc.returncode == 0
                        else {"error": f"exit {proc.returncode}: {proc.stderr[-300:]}"})
    runs["mirrored"]["seconds"] = time.monotonic() - start

    start = time.monotonic()
    mwms_json = out / "distribute_mwms.json"
    cluster_log = io.StringIO()
    cluster = LocalCluster(_SCRIPT + ["--strategy", "mwms", "--out", str(mwms_json)],
                           workers=2, output=cluster_log, env=_env())
    code = cluster.run()
    (out / "distribute_mwms.log").write_text(cluster_log.getvalue())
    runs["mwms"] = (_compare(json.loads(mwms_json.read_text())) if code == 0
                    else {"error": f"exit {code}, see distribute_mwms.log"})
    runs["mwms"]["seconds"] = time.monotonic() - start

    (out / "distribute_demo.json").write_text(json.dumps(runs, indent=2))
    lines = [
        _line("MirroredStrategy, 2 replicas (model.fit, Lookahead(RectifiedAdam))",
              runs["mirrored"], runs["mirrored"]["seconds"]),
        _line("MultiWorkerMirroredStrategy, 2 worker processes "
              "(model.fit, Lookahead(RectifiedAdam))",
              runs["mwms"], runs["mwms"]["seconds"]),
    ]
    return lines


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for summary in run(sys.argv[1] if len(sys.argv) > 1 else "out"):
        log.info(summary)
