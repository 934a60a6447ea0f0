"""Receive buffers reused across requests (tensors.BufferPool), and the client's raw pull path.

* The pool hands a buffer out again only when nothing refers to it any more: a view, a
  memoryview or a TensorFlow tensor of it (DLPack, or a numpy-backed tensor) keeps it out of
  reuse, so two requests in flight never share one and a caller's arrays are never rewritten.
* A real server decodes later pushes into the buffers of earlier ones, a refused push in
  between changes nothing, and every value stays bit for bit what the same steps give in
  this process; a client reuses the arrays of an earlier pull only once the caller let go.
* The client's raw pull decoder refuses a response stream that is cut short (a chunk
  missing, a message cut, no header) with a precise error, through a real gRPC channel.
"""

from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf

from radam_dist.ps.client import PSClient
from radam_dist.ps.proto import pb
from radam_dist.ps.pushes import Gradient
from radam_dist.ps.tensors import ALIGNMENT, BufferPool, WireError, serialized_chunks

from test_ps_zero_copy import CONFIG, _store, _values


HOLDERS = {
    "view": lambda a: a.view(np.float32).reshape(10, 100),
    "slice": lambda a: a[100:200],
    "memoryview": memoryview,
    "dlpack tensor": lambda a: tf.experimental.dlpack.from_dlpack(a.view(np.float32).__dlpack__()),
    "tensor": lambda a: tf.convert_to_tensor(a.view(np.float32)),  # (a copy, or a reference)
}


def _content(holder) -> bytes:
    return holder.numpy().tobytes() if isinstance(holder, tf.Tensor) else bytes(memoryview(holder))


@pytest.mark.parametrize("kind", sorted(HOLDERS))
def test_pool_reuses_only_buffers_nobody_holds(kind):
    pool = BufferPool(4000)  # keeps exactly one 4000-byte buffer
    first = pool.take(4000)
    address = first.ctypes.data
    assert address % ALIGNMENT == 0 and first.nbytes == 4000 and pool.held == 4000
    first[:] = np.arange(4000) % 251
    holder = HOLDERS[kind](first)
    expected = _content(holder)
    del first
    busy = pool.take(4000)  # while ``holder`` may read the buffer, a take gets other memory
    busy[:] = 255
    assert _content(holder) == expected
    if kind != "tensor":  # (TensorFlow may copy the array: then nothing refers to the buffer)
        assert busy.ctypes.data != address and pool.reused == 0
    del busy, holder
    again = pool.take(4000)  # nothing refers to it any more: the same memory again
    assert again.ctypes.data == address and pool.reused >= 1
    assert pool.take(4000).ctypes.data != address  # ... and only to one taker at a time


def test_pool_limit():
    pool = BufferPool(10_000)
    kept = [pool.take(4000) for _ in range(3)]  # the third does not fit the limit: not kept
    assert pool.held == 8000
    del kept
    two = [pool.take(4000) for _ in range(2)]  # both kept ones again, each to one taker
    assert two[0].ctypes.data != two[1].ctypes.data and pool.reused == 2
    assert pool.take(8000).nbytes == 8000  # other sizes: their own buffers
    off = BufferPool(0)  # 0: nothing kept, nothing reused
    a = off.take(4000)
    del a
    off.take(4000)
    assert off.reused == 0 and off.held == 0


def test_server_reuses_buffers_and_a_refused_push_changes_nothing(tmp_path):
    from radam_dist.ps.server import ParameterServerProcess
    from radam_dist.ps.options import ServeOptions

    values = _values()
    reference = _store(values)
    process = ParameterServerProcess(ServeOptions(mode="async", max_staleness=-1))
    process.start()
    client = PSClient([f"127.0.0.1:{process.port}"])
    try:
        client.register(values, CONFIG)
        rng = np.random.default_rng(3)
        seen = set()
        for step in range(4):
            grads = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in values.items()}
            if step == 2:  # refused: "b" (decoded after "a", into a reused buffer) holds a NaN
                bad = dict(grads, b=grads["b"].copy())
                bad["b"][-1] = np.nan
                before = client.pull()
                version = client.versions[0]
                with pytest.raises(grpc.RpcError) as excinfo:
                    client.push_pull(bad)
                assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                after = client.pull()
                assert client.versions[0] == version
                for name in values:
                    assert after[name].tobytes() == before[name].tobytes(), name
                del before, after
            _, pulled = client.push_pull(grads)
            reference.apply({n: Gradient(g) for n, g in grads.items()})
            expected = reference.read(reference.names)
            for name in values:
                assert pulled[name].tobytes() == expected[name].tobytes(), (step, name)
            held = {name: pulled[name].ctypes.data for name in values}
            assert not seen & set(held.values())  # arrays the test still holds are never reused
            seen = set(held.values())
            kept = pulled  # held across the next call on purpose
            del pulled
        assert process.service.wire.receive_pool.reused >= 2 * 3  # 2 gradients, steps 1-3 (and 2's refusal)
        assert client._receive_pool.reused >= 1
        del kept
    finally:
        client.close()
        process.stop(grace=1)


class _CutServer:
    """A gRPC server whose Pull answers ``responses`` (raw PullResponse bytes) as they are."""

    def __init__(self, responses):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler("radam_dist.ps.v1.ParameterServer", {
            "Pull": grpc.unary_stream_rpc_method_handler(lambda request, context: iter(responses))})
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def _pull_through(responses):
    server = _CutServer(responses)
    client = PSClient([f"127.0.0.1:{server.port}"], retry_timeout=0)
    try:
        return client._call(0, lambda stub, kw: client._collect(stub.Pull(pb.PullRequest(), **kw)))
    finally:
        client.close()
        server.server.stop(0)


def test_client_refuses_a_cut_response_precisely():
    value = np.arange(1000, dtype=np.float32)
    header = pb.PullResponse(header=pb.PullHeader(version=7)).SerializeToString()
    chunks = list(serialized_chunks(pb, "w", pb.VALUE, value, pb.PullResponse, chunk_bytes=1000))
    assert len(chunks) == 4
    header_out, values = _pull_through([header] + chunks)  # whole: arrives intact
    assert header_out.version == 7 and values["w"].tobytes() == value.tobytes()
    with pytest.raises(WireError, match=r"'w': stream ended after 3000 of 4000 bytes \(truncated\)"):
        _pull_through([header] + chunks[:3])
    with pytest.raises(WireError, match="malformed message"):
        _pull_through([header] + chunks[:3] + [chunks[3][:500]])
    with pytest.raises(WireError, match="ended without a PullHeader"):
        _pull_through(chunks)
