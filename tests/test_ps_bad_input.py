"""Every kind of bad input gets a precise gRPC status and leaves the server exactly as it was.

Crafted streams go through the raw generated stub (so the client library cannot tidy them up);
after each refusal the parameters, the version and the optimizer step are compared with a
snapshot taken before.
"""

import grpc
import numpy as np
import pytest

from ps_helpers import ServerPool, rpc_code
from radam_dist import RectifiedAdam
from radam_dist.ps.client import PSClient
from radam_dist.ps.proto import pb, pb_grpc

CONFIG = {"learning_rate": 0.01}
VALUES = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "emb": np.zeros((5, 2), np.float32)}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("bad"))
    try:
        strict, skipping = pool.start(
            ["--mode", "async", "--max-request-bytes", "65536"],
            ["--mode", "async", "--nonfinite", "skip"])
        yield strict, skipping
    finally:
        pool.close()


@pytest.fixture(scope="module")
def strict(servers):
    client = PSClient([servers[0].target], validate=False, retry_timeout=0)
    client.register(VALUES, CONFIG)
    client.push({"w": np.ones((3, 2), np.float32)})  # some optimizer state to protect
    channel = grpc.insecure_channel(servers[0].target, options=[
        ("grpc.max_send_message_length", 64 << 20)])
    yield client, pb_grpc.ParameterServerStub(channel)
    channel.close()
    client.close()


def snapshot(client):
    stats = client.stats()[0]
    return stats["version"], stats["step"], client.pull()


def assert_unchanged(client, before):
    version, step, values = snapshot(client)
    assert (version, step) == before[:2]
    for name, value in before[2].items():
        np.testing.assert_array_equal(values[name], value)


def push_stream(*chunks, header=None):
    yield pb.PushRequest(header=header or pb.PushHeader(worker_id="raw", base_version=1))
    for c in chunks:
        yield pb.PushRequest(chunk=c)


def chunk(name, role, array=None, dtype=None, shape=None, offset=0, data=None):
    c = pb.TensorChunk(name=name, role=role, offset=offset)
    if array is not None:
        c.dtype, data = array.dtype.name, array.tobytes()
        c.shape.extend(array.shape)
    if dtype is not None:
        c.dtype = dtype
    if shape is not None:
        c.shape.extend(shape)
    c.data = data or b""
    return c


G = pb.GRADIENT
SV, SI = pb.SPARSE_VALUES, pb.SPARSE_INDICES
F32 = np.float32

CASES = {
    "wrong shape": ("INVALID_ARGUMENT", "has shape (2, 3)",
                    lambda: [chunk("w", G, np.ones((2, 3), F32))]),
    "wrong dtype": ("INVALID_ARGUMENT", "has dtype float64",
                    lambda: [chunk("w", G, np.ones((3, 2), np.float64))]),
    "unknown variable": ("NOT_FOUND", "unknown variable",
                         lambda: [chunk("nope", G, np.ones((3, 2), F32))]),
    "NaN gradient": ("INVALID_ARGUMENT", "NaN or Inf",
                     lambda: [chunk("w", G, np.array([[1, np.nan]] * 3, F32))]),
    "Inf in sparse rows": ("INVALID_ARGUMENT", "NaN or Inf",
                           lambda: [chunk("emb", SV, np.array([[np.inf, 0]], F32)),
                                    chunk("emb", SI, np.array([1], np.int64))]),
    "index out of range": ("INVALID_ARGUMENT", "out of range",
                           lambda: [chunk("emb", SV, np.ones((2, 2), F32)),
                                    chunk("emb", SI, np.array([1, 5], np.int64))]),
    "negative index": ("INVALID_ARGUMENT", "out of range",
                       lambda: [chunk("emb", SV, np.ones((1, 2), F32)),
                                chunk("emb", SI, np.array([-1], np.int64))]),
    "rows and indices disagree": ("INVALID_ARGUMENT", "values have shape",
                                  lambda: [chunk("emb", SV, np.ones((2, 2), F32)),
                                           chunk("emb", SI, np.array([1], np.int64))]),
    "float indices": ("INVALID_ARGUMENT", "indices must be a 1-d int32/int64",
                      lambda: [chunk("emb", SV, np.ones((1, 2), F32)),
                               chunk("emb", SI, np.array([1.0], F32))]),
    "sparse values without indices": ("INVALID_ARGUMENT", "needs both values and indices",
                                      lambda: [chunk("emb", SV, np.ones((1, 2), F32))]),
    "dense and sparse at once": ("INVALID_ARGUMENT", "both a dense and a sparse",
                                 lambda: [chunk("emb", G, np.ones((5, 2), F32)),
                                          chunk("emb", SV, np.ones((1, 2), F32)),
                                          chunk("emb", SI, np.array([1], np.int64))]),
    "truncated stream": ("INVALID_ARGUMENT", "truncated",
                         lambda: [chunk("w", G, dtype="float32", shape=(3, 2),
                                        data=np.ones(4, F32).tobytes())]),
    "more data than declared": ("INVALID_ARGUMENT", "more than the",
                                lambda: [chunk("w", G, dtype="float32", shape=(3, 2),
                                               data=np.ones(7, F32).tobytes())]),
    "chunk out of order": ("INVALID_ARGUMENT", "expected 8",
                           lambda: [chunk("w", G, dtype="float32", shape=(3, 2),
                                          data=np.ones(2, F32).tobytes()),
                                    chunk("w", G, offset=12, data=np.ones(4, F32).tobytes())]),
    "first chunk not at 0": ("INVALID_ARGUMENT", "first chunk starts at byte 4",
                             lambda: [chunk("w", G, dtype="float32", shape=(3, 2), offset=4,
                                            data=b"\0" * 20)]),
    "unsupported dtype": ("INVALID_ARGUMENT", "unsupported dtype 'complex64'",
                          lambda: [chunk("w", G, np.ones((3, 2), np.complex64))]),
    "declared size over --max-request-bytes": (  # rows of a table: any count may be legal
        "RESOURCE_EXHAUSTED", "--max-request-bytes",
        lambda: [chunk("emb", SV, dtype="float32", shape=(10_000, 2), data=b"\0" * 1024)]),
    "declared size far above the registered variable": (  # refused before any allocation
        "INVALID_ARGUMENT", "the variable has (3, 2)",
        lambda: [chunk("w", G, dtype="float32", shape=(100_000_000,), data=b"\0" * 16)]),
    "element count overflows int64": ("INVALID_ARGUMENT", "more than an int64 can count",
                                      lambda: [chunk("w", G, dtype="float32", shape=(2**32, 2**32))]),
    "element count overflows int64 (3 * 2**62)": (
        "INVALID_ARGUMENT", "more than an int64 can count",
        lambda: [chunk("emb", SV, dtype="float32", shape=(2**62, 3))]),
    "sparse rows of the wrong width": ("INVALID_ARGUMENT", "rows of the variable have shape (2,)",
                                       lambda: [chunk("emb", SV, np.ones((1, 3), F32)),
                                                chunk("emb", SI, np.array([1], np.int64))]),
    "message over the gRPC limit": (
        "RESOURCE_EXHAUSTED", "",
        lambda: [chunk("w", G, dtype="float32", shape=(3_000_000,), data=b"\0" * (9 << 20))]),
    "wrong role in a push": ("INVALID_ARGUMENT", "not allowed",
                             lambda: [chunk("w", pb.VALUE, np.ones((3, 2), F32))]),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_push_is_refused_and_changes_nothing(strict, case):
    client, stub = strict
    code, text, make = CASES[case]
    before = snapshot(client)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Push(push_stream(*make(), header=pb.PushHeader(worker_id="raw", base_version=before[0])))
    assert excinfo.value.code().name == code, excinfo.value.details()
    assert text in (excinfo.value.details() or ""), excinfo.value.details()
    assert_unchanged(client, before)


@pytest.mark.timeout(60)
def test_stream_without_header_and_pull_of_unknown(strict):
    client, stub = strict
    before = snapshot(client)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Push(iter([pb.PushRequest(chunk=chunk("w", G, np.ones((3, 2), F32)))]))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.Pull(pb.PullRequest(names=["nope"])))
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as excinfo:  # PushPull asking for an unknown variable
        list(stub.PushPull(push_stream(chunk("w", G, np.ones((3, 2), F32)), header=pb.PushHeader(
            worker_id="raw", base_version=before[0], pull_names=["nope"]))))
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    assert_unchanged(client, before)


@pytest.mark.timeout(60)
def test_error_messages_stay_small(strict):
    """100k unknown names: NOT_FOUND naming a few of them and the count, not a message that
    overflows gRPC's metadata limit (which the client would see as RESOURCE_EXHAUSTED)."""
    client, stub = strict
    names = [f"no-such-variable-{i:06d}" for i in range(100_000)]
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.Pull(pb.PullRequest(names=names)))
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    details = excinfo.value.details()
    assert len(details) < 2500 and "99995 more" in details and "(100000)" in details, details[:300]


@pytest.mark.timeout(60)
def test_registration_conflicts(strict, servers):
    client, stub = strict
    before = snapshot(client)
    target = servers[0].target
    with pytest.raises(grpc.RpcError) as excinfo:
        PSClient([target], retry_timeout=0).register(VALUES, {"learning_rate": 0.5})
    assert rpc_code(excinfo) == "FAILED_PRECONDITION"
    assert "different optimizer config" in excinfo.value.details()
    with pytest.raises(grpc.RpcError) as excinfo:
        PSClient([target], retry_timeout=0).register(dict(VALUES, extra=np.ones(2, F32)), CONFIG)
    assert rpc_code(excinfo) == "FAILED_PRECONDITION"
    assert "variables differ" in excinfo.value.details()
    with pytest.raises(grpc.RpcError) as excinfo:  # the client thinks there are two shards
        PSClient([target, target], retry_timeout=0, split_threshold_bytes=1).register(VALUES, CONFIG)
    assert rpc_code(excinfo) == "FAILED_PRECONDITION"
    assert_unchanged(client, before)
    # The same config, written as an optimizer instance, re-attaches and keeps the values.
    again = PSClient([target])
    assert again.register({n: v + 100 for n, v in VALUES.items()}, RectifiedAdam(learning_rate=0.01)) == before[0]
    assert_unchanged(client, before)


@pytest.mark.timeout(60)
def test_client_side_validation_sends_nothing(strict, servers):
    client, _ = strict
    before = snapshot(client)
    checked = PSClient([servers[0].target])
    checked.attach()
    with pytest.raises(ValueError, match="has shape"):
        checked.push({"w": np.ones((2, 2), F32)})
    with pytest.raises(ValueError, match="out of range"):
        checked.push({"emb": (np.ones((1, 2), F32), np.array([9]))})
    with pytest.raises(KeyError):
        checked.push({"nope": np.ones(1, F32)})
    assert_unchanged(client, before)
    # Every crafted push was counted as refused, except the one gRPC itself stopped.
    assert client.stats()[0]["pushes_refused"] >= len(CASES) - 1


@pytest.mark.timeout(90)
def test_before_registration_bad_config_and_nonfinite_skip(servers):
    skipping = PSClient([servers[1].target], validate=False, retry_timeout=0)
    channel = grpc.insecure_channel(servers[1].target)
    stub = pb_grpc.ParameterServerStub(channel)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Push(push_stream(chunk("w", G, np.ones((3, 2), F32)), header=pb.PushHeader(base_version=0)))
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.Pull(pb.PullRequest()))
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for bad_config, text in (({"learning_rate": 0.1, "beta_1": 1.5}, "beta_1"),
                             ({"class_name": "Adam", "config": {}}, "RectifiedAdam")):
        with pytest.raises(grpc.RpcError) as excinfo:
            skipping.register(VALUES, bad_config)
        assert rpc_code(excinfo) == "INVALID_ARGUMENT" and text in excinfo.value.details()
    with pytest.raises(grpc.RpcError) as excinfo:
        skipping.register({"ids": np.arange(3)}, CONFIG)
    assert rpc_code(excinfo) == "INVALID_ARGUMENT" and "trainable parameters must be" in excinfo.value.details()
    assert skipping.stats()[0]["variables"] == []  # nothing was registered by the refusals
    skipping.register(VALUES, CONFIG)
    before = snapshot(skipping)
    response = stub.Push(push_stream(chunk("w", G, np.full((3, 2), np.nan, F32)),
                                     header=pb.PushHeader(base_version=0, request_id="nan-1")))
    assert response.skipped and response.version == 0
    assert_unchanged(skipping, before)
    assert skipping.stats()[0]["pushes_skipped"] == 1
    channel.close()
