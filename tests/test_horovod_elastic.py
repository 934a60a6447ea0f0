"""Elastic Horovod under Keras 3 (radam_dist.horovod.elastic), in real elastic jobs.

Two jobs through ``deploy/horovod/run_elastic.sh`` (horovodrun with a host-discovery
script and --network-interface) on this one machine, under three names for it:
``localhost``, this machine's hostname (when it resolves to 127.x) and ``127.0.0.1``.
Horovod tells hosts apart by name, so a failed worker blacklists only its own name, the
job goes on with the others, and a worker can join on a name not yet used.
The worker (tests/horovod_scripts/elastic_worker.py) averages the gradients of shards of
fixed global batches, so whatever the size, every step is a step on the global batch: the
result must equal one process trained on those batches (its ``reference.npz``).

Tolerance: rtol 1e-5, atol 1e-6 (float32 round-off of half-batch means averaged vs. the
full-batch mean, over 18-30 steps; measured max |diff| ~6e-8). Restoring the wrong commit
or repeating/skipping a step changes ``iterations`` and the weights far beyond that.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from horovod_helpers import load_npz as _load
from horovod_helpers import run_job

ROOT = Path(__file__).resolve().parents[1]
RUN_ELASTIC = ROOT / "deploy" / "horovod" / "run_elastic.sh"
WORKER = ROOT / "tests" / "horovod_scripts" / "elastic_worker.py"
OTHER_HOST = socket.gethostname()


def _second_host_name_reason():
    if OTHER_HOST in ("localhost", ""):
        return "this machine's hostname is 'localhost': no second host name for Horovod"
    try:
        address = socket.gethostbyname(OTHER_HOST)
    except OSError as exc:
        return f"hostname {OTHER_HOST!r} does not resolve ({exc})"
    if not address.startswith("127."):
        return f"hostname {OTHER_HOST!r} resolves to {address}, not a loopback address"
    return None


_REASON = _second_host_name_reason()
needs_two_names = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
pytestmark = [pytest.mark.horovod, needs_two_names, pytest.mark.timeout(300)]


def elastic_job(tmp_path: Path, hosts: list, np_: int, *worker_args: str, timeout: float = 150):
    """Run one elastic job; returns (returncode, output, events by pid, seconds)."""
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("".join(f"{h}\n" for h in hosts))
    out = tmp_path / "out"
    env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", HOSTS_FILE=str(hosts_file),
        NP=str(np_), MIN_NP="1", MAX_NP="2", ELASTIC_TIMEOUT="60", SCRIPT=str(WORKER),
        PYTHON=sys.executable,
    )
    cmd = [str(RUN_ELASTIC), *worker_args, "--out", str(out), "--hosts-file", str(hosts_file)]
    returncode, log, seconds = run_job(cmd, env, ROOT, timeout)
    events = {}
    for path in sorted(out.glob("events.*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        events[lines[0]["pid"]] = lines
    return returncode, log, events, out, seconds


def _assert_matches_reference(out: Path, final: dict) -> None:
    reference = _load(out / "reference.npz")
    assert final.keys() == reference.keys()
    assert int(final["iterations"]) == int(reference["iterations"])
    for key in reference:
        np.testing.assert_allclose(final[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _assert_ranks_identical(out: Path) -> dict:
    rank0, rank1 = _load(out / "final.rank0.npz"), _load(out / "final.rank1.npz")
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=f"ranks differ in {key}")
    return rank0


def _by_rank_at_end(events: dict) -> dict:
    return {ev[-1]["rank"]: ev for ev in events.values() if ev[-1]["event"] == "done"}


def _first(events: list, event: str, **match):
    return next(e for e in events
                if e["event"] == event and all(e.get(k) == v for k, v in match.items()))


THIRD_HOST = "127.0.0.1"  # a third name for this machine, for the worker that joins


@pytest.fixture(scope="module")
def loop_job(tmp_path_factory):
    """Custom loop, Lookahead(RectifiedAdam), 30 steps, commit every 5. Starts with two
    workers (localhost, hostname); the one on the hostname SIGKILLs itself at step 8; at step
    15 the survivor adds 127.0.0.1 to the host file, and a new worker joins there."""
    return elastic_job(
        tmp_path_factory.mktemp("elastic_loop"), ["localhost:1", f"{OTHER_HOST}:1"], 2, "loop",
        "--kill-at", "8", "--grow-at", "15", "--add-host", f"{THIRD_HOST}:1")


@pytest.fixture(scope="module")
def fit_job(tmp_path_factory):
    """model.fit, DistributedOptimizer(RectifiedAdam) + CommitState, 6 epochs of 3 batches.
    Two workers; the second dies at batch 2 of epoch 1; after epoch 2 a host is added."""
    return elastic_job(
        tmp_path_factory.mktemp("elastic_fit"), ["localhost:1", f"{OTHER_HOST}:1"], 2, "fit",
        "--optimizer", "radam", "--kill-at", "5", "--grow-at", "9", "--add-host", f"{THIRD_HOST}:1")


def _print_recovery(what: str, events: list, generation: int, since: dict, job_seconds=None):
    """Print how long ``events``' rank took from the ``since`` event to its reset into
    ``generation`` and to its first step there; returns (reset, first step) events."""
    reset = _first(events, "reset", generation=generation)
    resumed = _first(events, "step", generation=generation)
    job = f"; job {job_seconds:.1f} s" if job_seconds is not None else ""
    print(f"loop: {what} -> reset at size {reset['size']} {reset['t'] - since['t']:.2f} s, -> "
          f"first step at size {resumed['size']} {resumed['t'] - since['t']:.2f} s{job}")
    return reset, resumed


def _job_ok(job):
    rc, log, events, out, seconds = job
    assert rc == 0, log[-5000:]
    ranks = _by_rank_at_end(events)
    assert sorted(ranks) == [0, 1], log[-5000:]
    kill = next(e for ev in events.values() for e in ev if e["event"] == "kill")
    return log, ranks, kill, out, seconds


def test_custom_loop_survives_a_killed_worker(loop_job):
    """The survivor's grouped all-reduce fails; it restores the commit of step 5 (undoing
    steps 5-7), goes on alone from step 5, and the result equals the reference."""
    log, ranks, kill, out, seconds = _job_ok(loop_job)
    survivor = ranks[0]
    assert "HorovodGroupedAllreduce" in log, log[-5000:]
    assert "recovering from the last commit" in log, log[-5000:]
    reset, _ = _print_recovery("kill", survivor, 1, kill, seconds)
    assert reset["size"] == 1 and reset["step"] == 5
    again = _first(survivor, "enter", generation=1)
    assert again["restores"] == 1 and again["step"] == 5
    alone = [e["step"] for e in survivor if e["event"] == "step" and e["generation"] == 1]
    assert alone == list(range(5, 15))
    _assert_matches_reference(out, _load(out / "final.rank0.npz"))


def test_custom_loop_grows_when_a_host_is_added(loop_job):
    """At step 15 a host is added: the next commit raises HostsUpdatedInterrupt, both
    re-initialise at size 2, the newcomer (other initial weights) receives rank 0's whole
    state, the step function is re-traced at size 2 (traced at size 1 it would never
    all-reduce: a hang), and both finish with bit-identical weights and optimizer state."""
    log, ranks, kill, out, seconds = _job_ok(loop_job)
    first, newcomer = ranks[0], ranks[1]
    assert first[0]["pid"] != kill["pid"] and newcomer[0]["pid"] != kill["pid"]
    grow = _first(first, "grow")
    assert grow["size"] == 1 and _first(newcomer, "enter")["step"] == 15
    for ev in (first, newcomer):
        last = ev[-1]["generation"]
        at_two = [e["step"] for e in ev if e["event"] == "step" and e["generation"] == last]
        assert at_two == list(range(15, 30)) and ev[-1]["size"] == 2 and ev[-1]["step"] == 30
    final = _assert_ranks_identical(out)
    _assert_matches_reference(out, final)
    _print_recovery("host added", first, 2, grow)


def test_fit_survives_a_killed_worker_and_grows(fit_job):
    """The survivor repeats epoch 1 from the commit at its start (not epoch 2, not from the
    dead worker's batch) at size 1; after epoch 2 the job grows, fit is re-entered with
    initial_epoch=3 on both workers (Keras' train function re-traced at size 2: the worker
    feeds tf.data batches of unknown size, so no shape change would force it); state.epoch
    ends at 6, every epoch of the committed path ran once, ranks bit-identical, equal to the
    reference."""
    log, ranks, kill, out, seconds = _job_ok(fit_job)
    survivor, newcomer = ranks[0], ranks[1]
    epochs = [(e["epoch"], e["size"]) for e in survivor if e["event"] == "epoch"]
    assert epochs == [(0, 2), (1, 2), (1, 1), (2, 1), (3, 2), (4, 2), (5, 2)], epochs
    assert [(e["epoch"], e["size"]) for e in newcomer if e["event"] == "epoch"] == [
        (3, 2), (4, 2), (5, 2)]
    for ev in (survivor, newcomer):
        assert ev[-1]["epoch"] == 6
    assert survivor[-1]["restores"] == 1
    final = _assert_ranks_identical(out)
    assert int(final["iterations"]) == 18
    _assert_matches_reference(out, final)
    restart = _first(survivor, "epoch", size=1)
    grow = _first(survivor, "grow")
    grown = _first(survivor, "epoch", epoch=3)
    print(f"fit: kill -> epoch restart at size 1 {restart['t'] - kill['t']:.2f} s; host added "
          f"-> epoch 3 at size 2 {grown['t'] - grow['t']:.2f} s; job {seconds:.1f} s")
