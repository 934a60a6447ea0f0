"""The parameter server's copy-free paths (bench/ps_throughput.py) change no value.

* ``ParameterStore.read`` hands out views of the variables' buffers instead of copies: a later
  optimizer step must not show through a snapshot that is still being streamed, and nobody
  may write through one.
* ``TensorAssembler`` assembles into an uninitialised buffer: every byte must be the sender's,
  and a tensor with bytes missing is refused rather than handed over with garbage in it.
* ``serialized_chunks`` (the client's push encoder, protobuf for the small fields and the data
  field appended by hand) produces exactly the messages ``chunk_tensor`` builds.
* ``parse_chunk_message`` (the client's pull decoder: the data field cut out by hand, the rest
  parsed by protobuf) gives the header, or the chunk and its data, of any encoding of a
  message, and refuses malformed bytes with a WireError.
* End to end through a real ``radam-ps serve`` process, push_pull gives bit for bit the values
  that the same RAdam steps give in this process (the one home of the math, radam_math, run
  by the store).
"""

import json

import numpy as np
import pytest

from ps_helpers import ServerPool
from radam_dist.ps.client import PSClient
from radam_dist.ps.proto import pb
from radam_dist.ps.pushes import Gradient
from radam_dist.ps.store import ParameterStore, VariableSpec
from radam_dist.ps.tensors import (TensorAssembler, WireError, chunk_tensor, parse_chunk_message,
                                   serialized_chunks)

CONFIG = {"learning_rate": 0.01}


def _store(values):
    store = ParameterStore()
    specs = [VariableSpec(n, v.dtype.name, v.shape, 0, v.shape[0] if v.ndim else 0)
             for n, v in values.items()]
    store.create(store.check_registration(json.dumps(CONFIG), specs), specs,
                 {n: v.copy() for n, v in values.items()})
    return store


def _values(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(300, 7)).astype(np.float32),
            "b": rng.normal(size=1000).astype(np.float32)}


def test_snapshot_survives_later_steps_and_is_read_only():
    values = _values()
    store = _store(values)
    snapshot = store.read(store.names)
    for name, view in snapshot.items():
        np.testing.assert_array_equal(view, values[name])
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[...] = 0
    rng = np.random.default_rng(1)
    for _ in range(3):
        store.apply({n: Gradient(rng.normal(size=v.shape).astype(np.float32))
                     for n, v in values.items()})
    sparse = store.read(store.names)  # sparse steps update rows in place (scatter ops)
    sparse_before = {n: v.copy() for n, v in sparse.items()}
    store.apply({"a": Gradient(rng.normal(size=(2, 7)).astype(np.float32), np.array([4, 9]))})
    after = store.read(store.names)
    assert not np.array_equal(after["a"][[4, 9]], sparse_before["a"][[4, 9]])
    for name in values:
        np.testing.assert_array_equal(sparse[name], sparse_before[name])
        np.testing.assert_array_equal(snapshot[name], values[name])  # unchanged by the steps
        assert not np.array_equal(after[name], values[name])  # the steps did happen


def test_assembler_fills_every_byte_and_refuses_gaps():
    array = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
    chunks = list(chunk_tensor(pb, "x", pb.GRADIENT, array, chunk_bytes=1000))
    assembler = TensorAssembler(1 << 30, frozenset({pb.GRADIENT}))
    assert sum(assembler.add(c) for c in chunks) == array.nbytes
    out = assembler.finish()[("x", pb.GRADIENT)]
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)

    truncated = TensorAssembler(1 << 30, frozenset({pb.GRADIENT}))
    for c in chunks[:-1]:
        truncated.add(c)
    with pytest.raises(WireError, match="truncated"):
        truncated.finish()


@pytest.mark.parametrize("array", [
    np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000),  # several chunks, a short last one
    np.float32(2.5),  # 0-d
    np.zeros((0, 4), np.float64),  # empty: one chunk without data
    np.arange(300, dtype=np.int64),  # sparse indices
    np.arange(1 << 15, dtype=np.uint8),  # a chunk longer than 127 bytes: multi-byte lengths
], ids=["multi-chunk", "scalar", "empty", "int64", "long"])
@pytest.mark.parametrize("wrap", [pb.PushRequest, pb.PullResponse], ids=["push", "pull"])
def test_serialized_chunks_parse_to_the_messages_chunk_tensor_builds(array, wrap):
    built = list(chunk_tensor(pb, "layer/kernel:0", pb.SPARSE_INDICES, array, 1000, wrap=wrap))
    raw = list(serialized_chunks(pb, "layer/kernel:0", pb.SPARSE_INDICES, array, wrap, 1000))
    assert len(raw) == len(built)
    for data, message in zip(raw, built):
        assert wrap.FromString(data) == message


def test_parse_chunk_message_reads_every_encoding():
    array = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
    for wrap in (pb.PullResponse, pb.PushRequest):
        built = list(chunk_tensor(pb, "a/b", pb.VALUE, array, 1000, wrap=wrap))
        encodings = [[m.SerializeToString() for m in built],
                     list(serialized_chunks(pb, "a/b", pb.VALUE, array, wrap, 1000))]
        for raws in encodings:
            for raw, message in zip(raws, built):
                header, chunk, data = parse_chunk_message(pb, wrap, raw)
                assert header is None and bytes(data) == message.chunk.data
                expected = type(message.chunk)()
                expected.CopyFrom(message.chunk)
                expected.ClearField("data")
                assert chunk == expected
    # the data field first, then the others (any field order is valid protobuf)
    meta = pb.TensorChunk(name="x", role=pb.VALUE, dtype="uint8", shape=[3])
    inner = b"\x32\x03abc" + meta.SerializeToString()
    raw = b"\x12" + bytes([len(inner)]) + inner
    header, chunk, data = parse_chunk_message(pb, pb.PullResponse, raw)
    assert bytes(data) == b"abc" and chunk == meta
    head = pb.PullResponse(header=pb.PullHeader(version=7, step=3)).SerializeToString()
    header, chunk, data = parse_chunk_message(pb, pb.PullResponse, head)
    assert chunk is None and header.version == 7 and header.step == 3
    for bad in (raw[:-1], b"\x12\xff", b"\x17"):  # cut, bad varint, wire type 7
        with pytest.raises(WireError, match="malformed"):
            parse_chunk_message(pb, pb.PullResponse, bad)


def test_push_pull_is_bit_identical_to_the_math_in_process(tmp_path):
    values = _values()
    reference = _store(values)
    pool = ServerPool(tmp_path)
    try:
        server = pool.start(["--mode", "async", "--max-staleness", "-1"])[0]
        client = PSClient([server.target])
        client.register(values, CONFIG)
        rng = np.random.default_rng(2)
        for _ in range(3):
            grads = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in values.items()}
            _, pulled = client.push_pull(grads)
            reference.apply({n: Gradient(g) for n, g in grads.items()})
            expected = reference.read(reference.names)
            for name in values:
                assert pulled[name].tobytes() == expected[name].tobytes(), name
        client.close()
    finally:
        pool.close()
