"""Sync mode across two shards equals one process running RectifiedAdam on the mean gradient.

Three concurrent workers push to two real server processes; one embedding table is split by
rows across the shards (so its optimizer slots are split too), the dense variables are placed
whole. After every round the servers' parameters must equal a single-process
``Lookahead(RectifiedAdam)`` that applied the averaged gradients, to float round-off.
"""

import threading

import keras
import numpy as np
import pytest

from ps_helpers import ServerPool, rpc_code
from radam_dist import Lookahead, RectifiedAdam
from radam_dist.ps.client import PSClient

WORKERS = 3
STEPS = 6
SHAPES = {"dense/kernel": (4, 3), "dense/bias": (3,), "emb": (20, 4)}


def make_optimizer():
    return Lookahead(RectifiedAdam(learning_rate=0.05, weight_decay=0.01, amsgrad=True),
                     sync_period=2, slow_step_size=0.5)


def initial_values():
    rng = np.random.default_rng(0)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def gradient(worker: int, step: int):
    """Deterministic gradients: dense ones, and sparse rows (with duplicates) of the table."""
    rng = np.random.default_rng(1000 * worker + step)
    grads = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items() if n != "emb"}
    indices = rng.integers(0, 20, size=6)
    indices[1] = indices[0]  # a duplicate row
    grads["emb"] = (rng.normal(size=(6, 4)).astype(np.float32), indices.astype(np.int64))
    return grads


def mean_gradients(step: int):
    """What the servers should apply: dense mean in worker order, sparse rows concatenated."""
    per_worker = [gradient(w, step) for w in range(WORKERS)]
    out = {}
    for name in SHAPES:
        if name == "emb":
            values = np.concatenate([g[name][0] for g in per_worker]) / np.float32(WORKERS)
            indices = np.concatenate([g[name][1] for g in per_worker])
            out[name] = (values.astype(np.float32), indices)
        else:
            total = np.zeros(SHAPES[name], np.float32)
            for g in per_worker:
                total += g[name]
            out[name] = total / np.float32(WORKERS)
    return out


def reference_trajectory():
    """Single process: one keras.Variable per parameter, the same optimizer, mean gradients."""
    import tensorflow as tf

    values = initial_values()
    names = sorted(SHAPES)
    variables = [keras.Variable(values[n], name=n.replace("/", "_")) for n in names]
    optimizer = make_optimizer()
    trajectory = []
    for step in range(STEPS):
        mean = mean_gradients(step)
        grads = []
        for n in names:
            g = mean[n]
            grads.append(tf.IndexedSlices(tf.constant(g[0]), tf.constant(g[1]), tf.constant(SHAPES[n], tf.int64))
                         if isinstance(g, tuple) else tf.constant(g))
        optimizer.apply_gradients(zip(grads, variables))
        trajectory.append({n: v.numpy() for n, v in zip(names, variables)})
    return trajectory


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("sync"))
    common = ["--mode", "sync", "--num-workers", str(WORKERS), "--sync-timeout", "120",
              "--num-shards", "2"]
    try:
        shards = pool.start(common + ["--shard-index", "0"], common + ["--shard-index", "1"],
                            ["--mode", "sync", "--num-workers", "2", "--sync-timeout", "1.5"],
                            env={"RADAM_PS_SERVER_KEY": "server-key-for-tests"})
        yield shards
    finally:
        pool.close()


@pytest.mark.timeout(240)
def test_three_workers_two_shards_equal_single_process(servers):
    targets = [s.target for s in servers[:2]]
    clients = [PSClient(targets, worker_id=f"w{i}", split_threshold_bytes=256) for i in range(WORKERS)]
    config = make_optimizer()
    clients[0].register(initial_values(), config)
    # The table is split by rows, the small variables are whole on one shard each.
    assert clients[0].placement["emb"].is_split
    assert not clients[0].placement["dense/bias"].is_split
    stats = clients[0].stats()
    assert [len(s["variables"]) for s in stats] != [0, 0]
    assert sorted(v["shape"][0] for s in stats for v in s["variables"] if v["name"] == "emb") == [10, 10]

    observed = [[None] * STEPS for _ in range(WORKERS)]
    errors = []

    def worker(i):
        try:
            client = clients[i]
            client.register(initial_values(), config)  # idempotent re-attach
            client.pull()
            for step in range(STEPS):
                version = client.push(gradient(i, step))
                assert version == step + 1
                observed[i][step] = client.pull()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors

    expected = reference_trajectory()
    for step in range(STEPS):
        for i in range(WORKERS):
            for name in SHAPES:
                np.testing.assert_allclose(observed[i][step][name], expected[step][name],
                                           rtol=2e-6, atol=2e-7, err_msg=f"{name} step {step} worker {i}")
    stats = clients[0].stats()
    assert [s["version"] for s in stats] == [STEPS, STEPS]
    assert [s["step"] for s in stats] == [STEPS, STEPS]  # identical step counts across shards
    assert sum(s["pushes_applied"] for s in stats) == 2 * WORKERS * STEPS
    for c in clients:
        c.close()


@pytest.mark.timeout(120)
def test_barrier_timeout_names_missing_worker_and_applies_nothing(servers):
    lone = servers[2]
    a = PSClient([lone.target], worker_id="early-a")
    b = PSClient([lone.target], worker_id="early-b")
    values = {"w": np.ones((3,), np.float32)}
    a.register(values, {"learning_rate": 0.1})
    b.register(values, {"learning_rate": 0.1})
    with pytest.raises(Exception) as excinfo:
        a.push({"w": np.ones(3, np.float32)})
    assert rpc_code(excinfo) == "DEADLINE_EXCEEDED"
    message = str(excinfo.value)
    assert "1 of 2 workers pushed (early-a)" in message and "never came" in message
    assert a.stats()[0]["version"] == 0
    np.testing.assert_array_equal(a.pull()["w"], values["w"])
    # With both workers the round completes.
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("b", b.push({"w": np.full(3, 3.0, np.float32)})))
    t.start()
    results["a"] = a.push({"w": np.ones(3, np.float32)})
    t.join(30)
    assert results == {"a": 1, "b": 1}
    # A push for an already-applied round is stale.
    b.versions = [0]
    from radam_dist.ps.client import StaleGradientError
    with pytest.raises(StaleGradientError):
        b.push({"w": np.ones(3, np.float32)})
    assert a.stats()[0]["version"] == 1
