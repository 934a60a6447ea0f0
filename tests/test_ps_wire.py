"""The server's hand-made wire format (service.add_to_server) is protobuf's, to the byte.

The server answers Pull / PushPull with bytes built by ``serialized_chunks`` and reads
Register / Push / PushPull from the raw request bytes with ``split_message``, bypassing the
generated (de)serializers. So:

* the bytes equal protobuf's own ``SerializeToString`` of the same message, for tensors of 0,
  1, chunk - 1, chunk and chunk + 1 bytes and for sizes whose length prefixes change width
  (127/128, 16383/16384 bytes);
* ``split_message`` reads every valid encoding as protobuf does (fields in any order, the
  oneof's last member wins, repeated occurrences merged, fields of the wrong wire type left
  unknown) and refuses malformed bytes with a WireError;
* NaN / Inf is found on arrival even when a chunk boundary cuts the element in two;
* end to end, garbage bytes and a straddling NaN get INVALID_ARGUMENT from a real server and
  change nothing.
"""

import grpc
import numpy as np
import pytest

from ps_helpers import ServerPool, rpc_code
from radam_dist.ps.client import PSClient
from radam_dist.ps.proto import pb, pb_grpc
from radam_dist.ps.tensors import (TensorAssembler, WireError, chunk_tensor, serialized_chunks,
                                   split_message)

CHUNK = 1000
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 127, 128, 16383, 16384, 3 * CHUNK + 7]


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("wrap", [pb.PullResponse, pb.PushRequest, pb.RegisterRequest],
                         ids=["pull", "push", "register"])
def test_serialized_chunks_are_protobufs_own_bytes(nbytes, wrap):
    array = (np.arange(nbytes, dtype=np.int64) % 251).astype(np.uint8)
    for chunk_bytes in (CHUNK, 1 << 20):  # several chunks; one chunk of any size
        built = [m.SerializeToString() for m in
                 chunk_tensor(pb, "layer/kernel:0", pb.VALUE, array, chunk_bytes, wrap=wrap)]
        raw = list(serialized_chunks(pb, "layer/kernel:0", pb.VALUE, array, wrap, chunk_bytes))
        assert raw == built
    # multi-byte dimensions and names, a 0-d tensor
    for value in (np.zeros((0, 300), np.float32), np.float64(2.5),
                  np.ones((2, 129), np.float16)):
        built = [m.SerializeToString() for m in chunk_tensor(pb, "ü" * 70, pb.VALUE, value, 100, wrap=wrap)]
        assert list(serialized_chunks(pb, "ü" * 70, pb.VALUE, value, wrap, 100)) == built


def _as_protobuf_reads_it(wrap, raw):
    message = wrap.FromString(raw)
    kind = message.WhichOneof("kind")
    if kind == "chunk":
        chunk = type(message.chunk)()
        chunk.CopyFrom(message.chunk)
        data = chunk.data
        chunk.ClearField("data")
        return kind, None, chunk, data
    return kind, message.header if kind == "header" else None, None, None


def _field(number, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_split_message_reads_any_encoding_as_protobuf_does():
    meta = pb.TensorChunk(name="x", role=pb.GRADIENT, dtype="uint8", shape=[3]).SerializeToString()
    header = pb.PushHeader(worker_id="w", base_version=4).SerializeToString()
    encodings = [
        b"",  # neither member
        _field(1, header),
        _field(2, meta + _field(6, b"abc")),
        _field(2, _field(6, b"abc") + meta),  # data first
        _field(2, meta + _field(6, b"old") + _field(6, b"new")),  # the last data wins
        _field(1, header) + _field(2, meta + _field(6, b"abc")),  # the oneof: last member wins
        _field(2, meta + _field(6, b"abc")) + _field(1, header),
        _field(2, meta) + _field(2, _field(6, b"abc")),  # two occurrences: protobuf merges them
        _field(2, meta + _field(6, b"abc")) + bytes([2 << 3 | 0, 5]),  # field 2 as a varint
        _field(2, meta + bytes([6 << 3 | 0, 7]) + _field(6, b"abc")),  # data as a varint
        bytes([9 << 3 | 0, 1]) + _field(2, meta + _field(6, b"abc")),  # an unknown field
    ]
    for raw in encodings:
        kind, got_header, chunk, data = split_message(pb, pb.PushRequest, raw)
        expected = _as_protobuf_reads_it(pb.PushRequest, raw)
        assert kind == expected[0], raw
        assert got_header == expected[1], raw
        if kind == "chunk":
            assert chunk == expected[2] and bytes(data) == expected[3], raw
    for bad in (_field(2, meta)[:-1], b"\x12\xff", b"\x17", b"\x12\x05\x32\x09abc"):
        with pytest.raises(WireError, match="malformed"):  # cut, bad varint, wire type 7, overrun
            split_message(pb, pb.PushRequest, bad)


@pytest.mark.parametrize("chunk_bytes", [4, 1001, 1 << 20])
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_nonfinite_found_on_arrival_across_chunk_boundaries(chunk_bytes, bad):
    for dtype in (np.float16, np.float32, np.float64):
        array = np.ones(3000, dtype)
        if bad is not None:
            array[250] = bad  # float32: bytes 1000..1003 (cut by 1001-byte chunks)
        assembler = TensorAssembler(1 << 30, frozenset({pb.GRADIENT}), check_finite=True)
        for raw in serialized_chunks(pb, "g", pb.GRADIENT, array, pb.PushRequest, chunk_bytes):
            _, _, chunk, data = split_message(pb, pb.PushRequest, raw)
            assembler.add(chunk, data)
        out = assembler.finish()[("g", pb.GRADIENT)]
        assert out.tobytes() == array.tobytes()
        assert assembler.finite() == {("g", pb.GRADIENT): bad is None}
    ints = TensorAssembler(1 << 30, frozenset({pb.SPARSE_INDICES}), check_finite=True)
    for c in chunk_tensor(pb, "i", pb.SPARSE_INDICES, np.arange(10), 8):
        ints.add(c)
    ints.finish()
    assert ints.finite() == {}  # not floats: nothing to say


def test_raw_streams_end_to_end(tmp_path):
    values = {"w": np.arange(3000, dtype=np.float32)}
    pool = ServerPool(tmp_path)
    try:
        server = pool.start(["--mode", "async", "--max-staleness", "-1"])[0]
        client = PSClient([server.target], validate=False, retry_timeout=0)
        client.register(values, {"learning_rate": 0.01})
        client.push({"w": np.ones(3000, np.float32)})
        before = client.stats()[0], client.pull()
        channel = grpc.insecure_channel(server.target)
        push = channel.stream_unary("/radam_dist.ps.v1.ParameterServer/Push")  # bytes as they are
        head = pb.PushRequest(header=pb.PushHeader(worker_id="raw", base_version=1)).SerializeToString()
        grad = np.ones(3000, np.float32)
        grad[250] = np.nan
        straddling = list(serialized_chunks(pb, "w", pb.GRADIENT, grad, pb.PushRequest, 1001))
        for stream in ([head, b"\x12\xff"], [b"\x17"], [head] + straddling):
            with pytest.raises(grpc.RpcError) as err:
                push(iter(stream))
            assert rpc_code(err) == "INVALID_ARGUMENT", err.value.details()
        after = client.stats()[0], client.pull()
        assert (after[0]["version"], after[0]["step"]) == (before[0]["version"], before[0]["step"])
        assert after[1]["w"].tobytes() == before[1]["w"].tobytes()
        # a finite push is applied, and the generated stub (protobuf's own parser) reads the
        # hand-made Pull answer as the values PushPull returned
        version, pulled = client.push_pull({"w": np.ones(3000, np.float32)})
        assert version == before[0]["version"] + 1 and not np.array_equal(pulled["w"], before[1]["w"])
        messages = list(pb_grpc.ParameterServerStub(channel).Pull(pb.PullRequest()))
        assert messages[0].header.version == version
        assert b"".join(m.chunk.data for m in messages[1:]) == pulled["w"].tobytes()
        channel.close()
        client.close()
    finally:
        pool.close()
