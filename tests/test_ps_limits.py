"""Memory bounded by what is registered, and registrations validated, on a real server.

Declared sizes are checked against the registered variable before a buffer exists; a
server-wide budget bounds the bytes all calls in flight may hold (RESOURCE_EXHAUSTED beyond);
job ids must match exactly; hyperparameters that would turn the parameters into NaN are
refused at registration.
"""

import json
import threading
import time

import grpc
import numpy as np
import pytest

from ps_helpers import ServerPool, rpc_code
from radam_dist.ps.client import PSClient
from radam_dist.ps.proto import pb, pb_grpc

BUDGET = 1_000_000
VALUES = {"big": np.zeros(200_000, np.float32), "emb": np.zeros((10, 2), np.float32)}  # 800 KB + 80 B


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("limits"))
    try:
        yield pool.start(["--mode", "async", "--max-staleness", "-1", "--max-inflight-bytes", str(BUDGET)])[0]
    finally:
        pool.close()


@pytest.fixture
def stub(server):
    """A raw gRPC stub on the server, with VALUES registered (hostile messages are written by
    hand); the registering client closes after the test."""
    client = PSClient([server.target], retry_timeout=0)
    client.register(VALUES, {"learning_rate": 0.01})
    yield pb_grpc.ParameterServerStub(client._channels[0])
    client.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def header():
    return pb.PushRequest(header=pb.PushHeader(worker_id="raw", base_version=0))


def declared(name, role, dtype, shape, data=b"\0" * 16):
    c = pb.TensorChunk(name=name, role=role, dtype=dtype, offset=0, data=data)
    c.shape.extend(shape)
    return pb.PushRequest(chunk=c)


@pytest.mark.timeout(120)
def test_registration_is_validated(server):
    client = PSClient([server.target], retry_timeout=0)
    stub = pb_grpc.ParameterServerStub(client._channels[0])
    for config, text in (  # the servers build the optimizer, so RectifiedAdam's own checks
            ({"learning_rate": float("nan")}, "learning_rate must be finite and >= 0, got nan"),
            ({"learning_rate": -0.1}, "learning_rate must be finite and >= 0, got -0.1"),
            ({"learning_rate": float("inf")}, "learning_rate must be finite and >= 0, got inf"),
            ({"beta_2": 1.0}, "beta_2 must be in [0.0, 1.0)"),
            ({"beta_1": -0.5}, "beta_1 must be in [0.0, 1.0)")):
        # PSClient checks the config before it sends anything (the check the servers make) ...
        with pytest.raises(grpc.RpcError) as excinfo:
            client.register(VALUES, config)
        assert rpc_code(excinfo) == "INVALID_ARGUMENT" and text in str(excinfo.value), \
            str(excinfo.value)
        # ... and the server refuses the same config from a client that does not check
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Register(iter([pb.RegisterRequest(header=pb.RegisterHeader(
                optimizer_config_json=json.dumps(config)))]))
        assert rpc_code(excinfo) == "INVALID_ARGUMENT" and text in excinfo.value.details(), \
            excinfo.value.details()
    assert client.stats()[0]["variables"] == []
    assert client.register(VALUES, {"learning_rate": 0.01}) == 0
    # job ids must match exactly: no "accepted because the first had none"
    with pytest.raises(grpc.RpcError) as excinfo:
        PSClient([server.target], retry_timeout=0, job_id="other-job").register(VALUES, {"learning_rate": 0.01})
    assert rpc_code(excinfo) == "FAILED_PRECONDITION" and "holds job ''" in excinfo.value.details()
    # a re-registration declaring a huge tensor is refused before it is allocated
    c = declared("big", pb.VALUE, "float32", [100_000_000]).chunk
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Register(iter([pb.RegisterRequest(header=pb.RegisterHeader(
            optimizer_config_json='{"learning_rate": 0.01}')), pb.RegisterRequest(chunk=c)]))
    assert rpc_code(excinfo) == "FAILED_PRECONDITION" and "not registered" in excinfo.value.details()
    client.close()


@pytest.mark.timeout(120)
def test_hostile_declarations_do_not_grow_memory(server, stub):
    hostile = [  # 16 bytes sent, 400 MB declared
        [header(), declared("big", pb.GRADIENT, "float32", [100_000_000])],
        [header(), declared("emb", pb.SPARSE_VALUES, "float32", [50_000_000, 2])],
    ]
    before = rss_bytes(server.proc.pid)
    codes = []

    def call(messages):
        try:
            stub.Push(iter(messages))
        except grpc.RpcError as err:
            codes.append(err.code().name)

    for _ in range(3):
        threads = [threading.Thread(target=call, args=(m,)) for m in hostile * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(set(codes)) == ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"] and len(codes) == 12
    # every refusal is logged once on the server, with method, code, peer and worker id
    deadline = time.monotonic() + 10
    while server.log().count("refused Push") < 12 and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in server.log().splitlines() if "refused Push" in x and "INVALID_ARGUMENT" in x)
    assert "127.0.0.1" in line and "[worker 'raw', request '']" in line, line
    grown = rss_bytes(server.proc.pid) - before
    assert grown < 64 << 20, f"RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.timeout(120)
def test_inflight_budget_is_server_wide(stub):
    gate = threading.Event()
    first_chunk_sent = threading.Event()
    payload = np.ones(200_000, np.float32).tobytes()
    outcome = {}

    def held_stream():
        yield header()
        yield declared("big", pb.GRADIENT, "float32", [200_000], payload[:4096])
        first_chunk_sent.set()
        gate.wait(60)
        c = pb.TensorChunk(name="big", role=pb.GRADIENT, offset=4096, data=payload[4096:])
        yield pb.PushRequest(chunk=c)

    t = threading.Thread(target=lambda: outcome.setdefault("held", stub.Push(held_stream())))
    t.start()
    first_chunk_sent.wait(30)
    time.sleep(0.5)  # the server has read the first chunk and reserved 800 KB
    with pytest.raises(grpc.RpcError) as excinfo:  # 800 KB more does not fit 1 MB
        stub.Push(iter([header(), declared("big", pb.GRADIENT, "float32", [200_000], payload)]))
    assert rpc_code(excinfo) == "RESOURCE_EXHAUSTED"
    assert "--max-inflight-bytes" in excinfo.value.details() and "held by other calls" in excinfo.value.details()
    gate.set()
    t.join(60)
    assert outcome["held"].version >= 1  # the held call completes
    # its reservation was given back: the same push now fits
    response = stub.Push(iter([header(), declared("big", pb.GRADIENT, "float32", [200_000], payload)]))
    assert response.version == outcome["held"].version + 1
