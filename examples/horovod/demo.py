"""The Horovod part of ``make demo``: a two-rank ``horovodrun --gloo`` job on this machine.

Runs deploy/horovod/train_radam.py (Ranger = Lookahead(RectifiedAdam), 5 epochs) with two
ranks on localhost and reports the loss curve, the steps taken and whether both ranks ended
with bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "horovod" / "train_radam.py"
RANKS = 2
TIMEOUT_S = 120


def _horovodrun() -> str:
    path = Path(sys.executable).parent / "horovodrun"
    if path.exists():
        return str(path)
    found = shutil.which("horovodrun")
    if not found:
        raise FileNotFoundError(
            "horovodrun not found: build Horovod with `make horovod` (see docs/HOROVOD.md)"
        )
    return found


def run(out_dir: str) -> List[str]:
    """Train with two Horovod ranks; write checkpoints and logs to ``out_dir``; return summary lines."""
    if not SCRIPT.exists():
        raise FileNotFoundError(f"{SCRIPT} is missing: run the demo from a radam_dist checkout")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [
        _horovodrun(), "--gloo", "-np", str(RANKS), "-H", f"localhost:{RANKS}",
        sys.executable, str(SCRIPT), "--epochs", "5", "--samples", "4096", "--batch-size", "64",
        "--lr", "5e-3", "--lookahead", "--threads", "1",
        "--checkpoint-dir", str(out / "checkpoints"), "--out", str(out),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )
    try:
        log_text, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise RuntimeError(f"the horovodrun demo did not finish in {TIMEOUT_S} s") from None
    seconds = time.monotonic() - start
    (out / "horovodrun.log").write_text(log_text)
    if proc.returncode != 0:
        raise RuntimeError(
            f"horovodrun failed (exit {proc.returncode}); last lines:\n{log_text[-2000:]}"
        )
    summary = json.loads((out / "summary.json").read_text())
    digests = {(out / f"digest.rank{r}").read_text() for r in range(RANKS)}
    loss = summary["loss"]
    return [
        f"horovod: {RANKS} ranks (horovodrun --gloo), Lookahead(RectifiedAdam) via "
        f"radam_dist.horovod.DistributedOptimizer, {summary['steps']} steps in "
        f"{seconds:.1f} s wall (fit {summary['fit_seconds']:.1f} s)",
        f"horovod: loss {loss[0]:.4f} -> {loss[-1]:.4f} (averaged over ranks), "
        f"accuracy {summary['accuracy'][-1]:.3f}, lr scaled to {summary['learning_rate']:g}",
        f"horovod: weights identical on all ranks: {'yes' if len(digests) == 1 else 'NO'} "
        f"(digest {summary['weights_digest']}); checkpoints in {out / 'checkpoints'}",
    ]


def _kill(proc: subprocess.Popen) -> None:
    try:
        import psutil

        family = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or process gone
        family = []
    for child in family:
        try:
            child.kill()
        except Exception:
            pass
    proc.kill()
    proc.wait(timeout=10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the two-rank Horovod demo.")
    parser.add_argument("--out", default="out", help="output folder for checkpoints and logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for line in run(args.out):
        logger.info(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
