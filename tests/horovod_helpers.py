"""Launching real Horovod jobs (horovodrun, run_elastic.sh) from the tests, and reading what
they write.

A job runs in its own session; whatever happens (a timeout included), nothing it started is
left behind.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill the launcher and every process it started (by pid, then its process group)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def run_job(cmd: list, env: dict, cwd: Path, timeout: float):
    """Run a launcher to completion; (returncode, stdout + stderr, seconds).
    On a timeout the whole job is killed and TimeoutExpired raised."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return proc.returncode, out, time.monotonic() - start


def load_npz(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
