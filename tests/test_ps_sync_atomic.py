"""Sync rounds are all-or-nothing across shards (the two-phase protocol of docs/PS.md).

Two real shard processes with --wal; workers are real processes that die (os._exit) exactly
at each point of the protocol: after staging on shard 0 before shard 1, in the middle of the
stream to shard 1, after the commit before delivering it to shard 1 (every worker of the
round, then shard 1 SIGKILLed as well), and a coordinator SIGKILLed while a worker waits for
its round. After each, every
shard must be at the same (version, step) with parameters equal to a single process that
applied exactly the committed rounds, and every surviving worker must have been told the
truth (DEADLINE_EXCEEDED "nothing was applied on any shard", or success).
"""

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from ps_helpers import REPO, ServerPool, rpc_code

SHAPES = {"a": (8, 4), "b": (8, 4)}
SPLIT = 64  # bytes: both variables are split by rows, so every shard's push carries two tensors
CONFIG = {"learning_rate": 0.1}
TIMEOUT = "8"  # --sync-timeout (workers are processes that import TensorFlow: slow to start)


def initial():
    rng = np.random.default_rng(5)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def gradient(worker: str, round_: int):
    rng = np.random.default_rng([int(worker[1:]), round_])
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def reference(rounds):
    """Single process: RectifiedAdam on the mean gradient of each committed round's workers."""
    import keras
    import tensorflow as tf

    from radam_dist import RectifiedAdam

    values = initial()
    names = sorted(SHAPES)
    variables = [keras.Variable(values[n], name=n) for n in names]
    opt = RectifiedAdam(**CONFIG)
    for round_, workers in rounds:
        grads = []
        for n in names:
            total = np.zeros(SHAPES[n], np.float32)
            for w in sorted(workers):
                total += gradient(w, round_)[n]
            grads.append(tf.constant(total / np.float32(len(workers))))
        opt.apply_gradients(zip(grads, variables))
    return {n: v.numpy() for n, v in zip(names, variables)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("atomic")
    pool = ServerPool(d)
    common = ["--mode", "sync", "--num-workers", "2", "--sync-timeout", TIMEOUT, "--num-shards", "2",
              "--wal", "--checkpoint-interval", "0"]
    try:
        yield pool.start(*[common + ["--shard-index", str(i), "--checkpoint-dir", str(d / f"ckpt{i}")]
                           for i in range(2)], env={"RADAM_PS_SERVER_KEY": "server-key-for-tests"})
    finally:
        pool.close()


def client(shards, worker_id, **kw):
    from radam_dist.ps.client import PSClient

    c = PSClient([s.target for s in shards], worker_id=worker_id, split_threshold_bytes=SPLIT, **kw)
    c.register(initial(), CONFIG)
    c.pull()
    return c


def worker(shards, worker_id, round_, die_at=""):
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "ps_sync_worker.py"), ",".join(s.target for s in shards),
         worker_id, str(round_)] + (["--die-at", die_at] if die_at else []),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def raw_states(shards):
    from radam_dist.ps.client import PSClient

    out = []
    for s in shards:
        c = PSClient([s.target], retry_timeout=30)
        st = c.stats()[0]
        out.append((st["version"], st["step"]))
        c.close()
    return out


def assert_consistent(shards, rounds):
    observer = client(shards, "w9")
    values = observer.pull()  # delivers any committed round a shard is missing
    assert raw_states(shards) == [(len(rounds), len(rounds))] * 2
    expected = reference(rounds)
    for n in SHAPES:
        np.testing.assert_allclose(values[n], expected[n], rtol=1e-6, atol=1e-7, err_msg=n)
    observer.close()


@pytest.mark.timeout(400)
def test_worker_dies_at_each_point_of_the_protocol(shards):
    rounds = []
    survivor = client(shards, "w0", retry_timeout=30)
    # 1. w1 stages on shard 0 and dies before shard 1; 2. w1 dies in the middle of its stream
    #    to shard 1. Either way the round never commits: nothing is applied anywhere, and the
    #    survivor is told so.
    for die_at in ("staged:0", "mid-stream:1"):
        dead = worker(shards, "w1", 0, die_at)
        assert dead.wait(120) == 17, dead.stderr.read()[-3000:]
        with pytest.raises(grpc.RpcError) as excinfo:
            survivor.push(gradient("w0", 0))
        assert rpc_code(excinfo) == "DEADLINE_EXCEEDED"
        assert "1 of 2 workers pushed (w0)" in str(excinfo.value), str(excinfo.value)
        assert "Nothing was applied on any shard" in str(excinfo.value)
        assert raw_states(shards) == [(0, 0), (0, 0)]
    # 3. a replacement process with the same id joins: the round commits on both shards
    replacement = worker(shards, "w1", 0)
    deadline = time.monotonic() + 120
    while not survivor.round_outcome(0)[1] and time.monotonic() < deadline:
        time.sleep(0.05)  # the replacement has staged everywhere and waits for its round
    assert survivor.push(gradient("w0", 0)) == 1
    out, err = replacement.communicate(timeout=120)
    assert replacement.returncode == 0, err[-3000:]
    assert json.loads(out)["version"] == 1
    rounds.append((0, ["w0", "w1"]))
    assert raw_states(shards) == [(1, 1), (1, 1)]
    # 4. both workers die after the commit, before delivering it to shard 1: shard 0 applied
    #    round 1, shard 1 holds both staged pushes; the outcome is durable and queryable, and
    #    the next reader delivers it.
    dead = [worker(shards, w, 1, "committed") for w in ("w0", "w1")]
    for p in dead:
        assert p.wait(120) == 17, p.stderr.read()[-3000:]
    assert raw_states(shards) == [(2, 2), (1, 1)]
    status, members = survivor.round_outcome(1)
    assert status == "COMMITTED" and [w for w, _ in members] == ["w0", "w1"]
    rounds.append((1, ["w0", "w1"]))
    # ... and shard 1 is SIGKILLed too before anyone delivers: its staged pushes come back
    # from its write-ahead log, so it can still apply exactly that round
    shards[1].restart()
    assert_consistent(shards, rounds)
    # 5. a worker that retries a round already committed without it learns exactly that
    survivor.versions = [1, 1]
    from radam_dist.ps.client import StaleGradientError
    with pytest.raises(StaleGradientError, match="already applied"):
        survivor.push(gradient("w0", 1))
    assert_consistent(shards, rounds)


@pytest.mark.timeout(300)
def test_duplicate_worker_id_is_refused_precisely(shards):
    a, b, c = (client(shards, w, retry_timeout=30) for w in ("w0", "w0", "w1"))
    round_ = a.versions[0]
    results = {}

    def push(name, cl):
        try:
            results[name] = cl.push(gradient("w0" if name != "c" else "w1", round_))
        except Exception as err:  # noqa: BLE001
            results[name] = err

    ta = threading.Thread(target=push, args=("a", a))
    ta.start()
    deadline = time.monotonic() + 30
    while not a.round_outcome(round_)[1] and time.monotonic() < deadline:
        time.sleep(0.05)  # a is waiting in its round on shard 0
    push("b", b)  # the same worker id from another process
    assert isinstance(results["b"], grpc.RpcError) and results["b"].code().name == "ALREADY_EXISTS"
    assert "two processes share this worker id" in results["b"].details()
    push("c", c)
    ta.join(60)
    assert results["a"] == round_ + 1 and results["c"] == round_ + 1
    status, members = a.round_outcome(round_)
    assert status == "COMMITTED" and dict(members)["w0"] != ""
    assert raw_states(shards) == [(round_ + 1, round_ + 1)] * 2


@pytest.mark.timeout(400)
def test_coordinator_killed_while_a_worker_waits(shards):
    w0 = client(shards, "w0", retry_timeout=90)
    w1 = client(shards, "w1", retry_timeout=90)
    round_ = w0.versions[0]
    before = w0.pull()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("w0", w0.push(gradient("w0", round_))))
    t.start()
    deadline = time.monotonic() + 30
    while not w1.round_outcome(round_)[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    shards[0].restart()  # SIGKILL, then the same port: w0's commit call is retried
    version = w1.push(gradient("w1", round_))
    t.join(120)
    assert result.get("w0") == version == round_ + 1
    assert raw_states(shards) == [(round_ + 1, round_ + 1)] * 2
    values = w0.pull()
    # the round is the mean of exactly w0's and w1's gradient, applied once on both shards
    assert all(not np.array_equal(values[n], before[n]) for n in SHAPES)
