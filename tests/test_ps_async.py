"""Async mode: concurrent workers converge; stale gradients are refused and change nothing."""

import threading

import numpy as np
import pytest

from ps_helpers import ServerPool, rpc_code
from radam_dist.ps.client import PSClient, StaleGradientError

DIM = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("async"))
    try:
        yield pool.start(["--mode", "async", "--max-staleness", "3"])[0]
    finally:
        pool.close()


def least_squares_problem():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(256, DIM)).astype(np.float32)
    w_true = rng.normal(size=(DIM,)).astype(np.float32)
    return x, w_true, x @ w_true


@pytest.mark.timeout(180)
def test_async_workers_converge(server):
    x, w_true, y = least_squares_problem()
    clients = [PSClient([server.target], worker_id=f"async-{i}") for i in range(3)]
    clients[0].register({"w": np.zeros(DIM, np.float32)}, {"learning_rate": 0.05})

    def loss(w):
        return float(np.mean((x @ w - y) ** 2))

    initial = loss(np.zeros(DIM, np.float32))
    stale = [0] * 3
    errors = []

    def worker(i):
        rng = np.random.default_rng(i)
        client = clients[i]
        try:
            w = client.pull()["w"]
            for _ in range(60):
                batch = rng.integers(0, len(x), size=32)
                grad = 2 * x[batch].T @ (x[batch] @ w - y[batch]) / len(batch)
                try:
                    _, params = client.push_pull({"w": grad.astype(np.float32)})
                    w = params["w"]
                except StaleGradientError:
                    stale[i] += 1
                    w = client.pull()["w"]
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    final = loss(clients[0].pull()["w"])
    stats = clients[0].stats()[0]
    assert stats["pushes_applied"] + sum(stale) == 180
    assert stats["version"] == stats["pushes_applied"]
    assert final < 0.02 * initial, (initial, final)


@pytest.mark.timeout(60)
def test_stale_push_is_refused_and_changes_nothing(server):
    slow = PSClient([server.target], worker_id="slow")
    fast = PSClient([server.target], worker_id="fast")
    slow.attach()
    fast.attach()
    slow.pull()
    fast.pull()
    for _ in range(4):  # staleness 4 > --max-staleness 3
        fast.push({"w": np.ones(DIM, np.float32)})
    before = fast.pull()["w"]
    before_stats = fast.stats()[0]
    with pytest.raises(StaleGradientError) as excinfo:
        slow.push({"w": np.ones(DIM, np.float32)})
    assert rpc_code(excinfo) == "ABORTED"
    assert "staleness 4 > --max-staleness 3" in str(excinfo.value)
    after_stats = fast.stats()[0]
    np.testing.assert_array_equal(fast.pull()["w"], before)
    assert after_stats["version"] == before_stats["version"]
    assert after_stats["pushes_refused"] == before_stats["pushes_refused"] + 1
    # Within the bound, an older base version is accepted.
    slow.pull()
    fast.push({"w": np.ones(DIM, np.float32)})
    assert slow.push({"w": np.ones(DIM, np.float32)}) == before_stats["version"] + 2


@pytest.mark.timeout(60)
def test_retried_push_applies_once_and_conditional_pull(server):
    """A push retried with the same request id is acknowledged without a second update;
    Pull with if_newer_than sends nothing unless the version moved."""
    import grpc

    from radam_dist.ps.proto import pb, pb_grpc
    from radam_dist.ps.tensors import chunk_tensor

    client = PSClient([server.target], worker_id="retry")
    client.attach()
    before = client.pull()
    version = client.stats()[0]["version"]
    assert client.pull(if_newer_than=version) == {}
    assert set(client.pull(if_newer_than=version - 1)) == {"w"}

    def request():
        yield pb.PushRequest(header=pb.PushHeader(worker_id="retry", base_version=version,
                                                  request_id="same-id-twice"))
        yield from chunk_tensor(pb, "w", pb.GRADIENT, np.ones(DIM, np.float32), wrap=pb.PushRequest)

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        first = stub.Push(request())
        after_first = client.pull()["w"]
        second = stub.Push(request())
    assert (first.version, first.duplicate) == (version + 1, False)
    assert (second.version, second.duplicate) == (version + 1, True)
    np.testing.assert_array_equal(client.pull()["w"], after_first)
    assert not np.array_equal(after_first, before["w"])
    assert client.stats()[0]["version"] == version + 1
