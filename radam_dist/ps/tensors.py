"""Tensors on the wire: raw bytes + dtype + shape, cut into chunks and put back together.

A gRPC message is limited (4 MiB by default); a parameter of 100M floats is 400 MB. Every
tensor therefore travels as a sequence of ``TensorChunk`` messages. The receiver
(``TensorAssembler``) checks each chunk against the declared dtype and shape, refuses
oversized, overlapping or out-of-order data, and at the end of the stream refuses truncated
tensors, so a damaged stream never reaches the optimizer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import sys
import threading
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
from google.protobuf.message import DecodeError as _DecodeError

# Dtypes accepted on the wire (names as numpy spells them).
WIRE_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8", "int8", "bool"}
)
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: far below the message limit, few enough messages
INT64_MAX = (1 << 63) - 1
ALIGNMENT = 64  # bytes: what TensorFlow's CPU kernels expect of a tensor's buffer
log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_allocator_tuned = False


def reuse_freed_memory(mmap_threshold: int = 16 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc keep and reuse the memory of freed chunk-sized buffers.

    Every 1 MiB chunk on the wire is a fresh Python bytes object (protobuf, gRPC). By default
    glibc serves such blocks with mmap or trims them back to the kernel once freed, so every
    chunk pays a page fault per 4 KiB page -- on the benchmark machine that alone cost more
    than moving the bytes (docs/BENCHMARKS.md, "Parameter server"). Raising the mmap and trim
    thresholds keeps up to ``trim_threshold`` bytes of freed heap for reuse; arrays larger
    than ``mmap_threshold`` (parameters, receive buffers) are still mapped directly. Process-
    wide and idempotent; returns False (and changes nothing) where the C library is not glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    if not ok:
        log.debug("mallopt refused the allocator thresholds; keeping the defaults")
    _allocator_tuned = ok
    return ok


class WireError(ValueError):
    """A malformed stream. ``code`` names the gRPC status it maps to."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code


def numpy_dtype(name: str) -> np.dtype:
    if name not in WIRE_DTYPES:
        raise WireError(f"unsupported dtype {name!r}; supported: {sorted(WIRE_DTYPES)}")
    if name == "bfloat16":
        from tensorflow.python.framework import dtypes  # numpy has no bfloat16 of its own

        return np.dtype(dtypes.bfloat16.as_numpy_dtype)
    return np.dtype(name)


def dtype_name(array: np.ndarray) -> str:
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise WireError(f"unsupported dtype {name!r}; supported: {sorted(WIRE_DTYPES)}")
    return name


def _pieces(pb, name: str, role: int, array: np.ndarray, chunk_bytes: int, wrap):
    """(message, its TensorChunk, the chunk's bytes as a memoryview): everything but ``data``."""
    array = np.asarray(array, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    view = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    total = view.nbytes
    offset = 0
    first = True
    while first or offset < total:
        end = min(offset + chunk_bytes, total)
        if wrap is None:
            message = chunk = pb.TensorChunk()
        else:
            message = wrap()
            chunk = message.chunk
        chunk.name = name
        chunk.role = role
        chunk.offset = offset
        if first:
            chunk.dtype = dtype_name(array)
            chunk.shape.extend(int(d) for d in array.shape)
            first = False
        yield message, chunk, view[offset:end]
        offset = end


def chunk_tensor(pb, name: str, role: int, array: np.ndarray,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, wrap=None) -> Iterator:
    """Yield ``pb.TensorChunk`` messages for ``array`` (always at least one, even if empty).

    With ``wrap`` (a message class with a ``chunk`` field, e.g. ``pb.PushRequest``) the chunks
    are built inside wrapper messages directly, saving a copy of every byte.
    """
    for message, chunk, data in _pieces(pb, name, role, array, chunk_bytes, wrap):
        chunk.data = data.tobytes()
        yield message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def serialized_chunks(pb, name: str, role: int, array: np.ndarray, wrap,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The messages of ``chunk_tensor(..., wrap=wrap)``, already serialized, with one copy of
    the data instead of three.

    protobuf serializes the small fields; the data field and the wrapper's length prefix are
    appended by hand (a length-delimited field is its tag, a varint length, the bytes), so the
    tensor's bytes are copied once, into the result. Each result is, byte for byte, what
    ``SerializeToString`` gives for the message ``chunk_tensor`` yields (tests/test_ps_wire.py),
    so the server answers Pull and PushPull with these bytes as they are."""
    data_tag = _varint(pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number << 3 | 2)
    chunk_tag = _varint(wrap.DESCRIPTOR.fields_by_name["chunk"].number << 3 | 2)
    for _, chunk, data in _pieces(pb, name, role, array, chunk_bytes, None):
        # (fields in number order and no empty data field, as protobuf writes them: the bytes
        # equal SerializeToString of the message, tests/test_ps_wire.py)
        head = chunk.SerializeToString() + (data_tag + _varint(data.nbytes) if data.nbytes else b"")
        yield b"".join((chunk_tag, _varint(len(head) + data.nbytes), head, data))


def _read_varint(buf, pos: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("malformed message: bad varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """(field number, wire type, tag start, value start, value end) of each field of
    buf[start:end]."""
    pos = start
    while pos < end:
        tag_start = pos
        tag, pos = _read_varint(buf, pos, end)
        wire_type = tag & 7
        if wire_type == 0:
            value_start = pos
            _, pos = _read_varint(buf, pos, end)
        elif wire_type == 2:
            length, value_start = _read_varint(buf, pos, end)
            pos = value_start + length
        elif wire_type in (1, 5):
            value_start = pos
            pos += 8 if wire_type == 1 else 4
        else:
            raise WireError(f"malformed message: wire type {wire_type}")
        if pos > end:
            raise WireError("malformed message: a field runs past its end")
        yield tag >> 3, wire_type, tag_start, value_start, pos


def split_message(pb, wrap, raw: bytes):
    """``(kind, header, chunk, data)`` of one serialized ``wrap`` message (``wrap`` has a
    ``header`` and a ``chunk`` field in a oneof named ``kind``): kind is "header" (header set),
    "chunk" (chunk and data set) or None (neither field: an empty message).

    The reverse of ``serialized_chunks``: ``data`` is a memoryview of ``raw``, and protobuf
    parses everything but the data, so the received bytes are copied once (into the tensor)
    instead of three times (parse, the bytes field, the tensor). Only length-delimited fields
    count as the header, the chunk or the data, as protobuf reads them; malformed bytes raise
    WireError (INVALID_ARGUMENT)."""
    fields = wrap.DESCRIPTOR.fields_by_name
    header_no, chunk_no = fields["header"].number, fields["chunk"].number
    data_no = pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number
    view = memoryview(raw)
    last, seen = None, 0
    for number, wire_type, _, start, end in _fields(view, 0, len(view)):
        if wire_type == 2 and number in (header_no, chunk_no):
            last, seen = (number, start, end), seen + 1
    if last is None:
        return None, None, None, None
    try:
        if seen > 1:  # valid but odd (protobuf merges repeated occurrences): protobuf decides
            message = wrap.FromString(raw)
            kind = message.WhichOneof("kind")
            if kind == "chunk":
                chunk = message.chunk
                data = memoryview(chunk.data)
                chunk.ClearField("data")
                return "chunk", None, chunk, data
            return kind, message.header if kind == "header" else None, None, None
        if last[0] == header_no:
            return "header", wrap.FromString(raw).header, None, None
        _, start, end = last
        data = view[0:0]
        kept = []
        position = start
        for number, wire_type, tag_start, value_start, value_end in _fields(view, start, end):
            if number == data_no and wire_type == 2:  # a scalar field: the last one counts
                kept.append(view[position:tag_start])
                position = value_end
                data = view[value_start:value_end]
        kept.append(view[position:end])
        chunk = pb.TensorChunk.FromString(b"".join(kept))
    except _DecodeError as err:
        raise WireError(f"malformed message: {err}") from err
    return "chunk", None, chunk, data


def parse_chunk_message(pb, wrap, raw: bytes):
    """``(header, None, None)`` or ``(None, chunk, data)`` for one serialized ``wrap`` message
    (``split_message`` without the kind; a message with neither field gives an empty chunk,
    which ``TensorAssembler.add`` refuses)."""
    kind, header, chunk, data = split_message(pb, wrap, raw)
    if kind is None:
        return None, pb.TensorChunk(), memoryview(b"")
    return header, chunk, data


class TimedStream:
    """A gRPC message stream that adds up the seconds spent waiting for its messages
    (``waited``): the wire's share of a call, for the split the benchmarks print."""

    def __init__(self, messages):
        self._messages = iter(messages)
        self.waited = 0.0

    def __iter__(self) -> "TimedStream":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._messages)
        finally:
            self.waited += time.perf_counter() - start


class ByteBudget:
    """Bytes that all calls in flight may hold at once (``--max-inflight-bytes``).

    A call reserves a tensor's declared size before the buffer exists and gives it back when
    it ends, so the server's memory for requests is bounded whatever the clients declare.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, what: str) -> None:
        with self._lock:
            if self.used + nbytes > self.limit:
                raise WireError(
                    f"{what} ({nbytes} bytes) does not fit the server's budget for requests in "
                    f"flight: {self.used} of {self.limit} bytes held by other calls "
                    "(--max-inflight-bytes); retry later", code="RESOURCE_EXHAUSTED")
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` that are already in memory (staged pushes replayed from the log),
        over the limit if need be: new calls then wait for them to go."""
        with self._lock:
            self.used += nbytes


def declared_nbytes(name: str, dtype: np.dtype, shape: Tuple[int, ...]) -> int:
    """Bytes a (dtype, shape) declares, computed without overflow; WireError beyond int64."""
    if any(d < 0 for d in shape):
        raise WireError(f"tensor {name!r}: negative dimension in shape {shape}")
    count = math.prod(shape)  # Python ints: exact
    if count > INT64_MAX or count * dtype.itemsize > INT64_MAX:
        raise WireError(f"tensor {name!r}: shape {list(shape)} has {count} elements, more than an "
                        "int64 can count")
    return count * dtype.itemsize


_FINITE_CHECKED = frozenset({"float16", "float32", "float64"})  # np.isfinite's own dtypes


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` whose data starts on an ALIGNMENT boundary
    (its ``base`` is the allocation, ALIGNMENT bytes longer)."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


class BufferPool:
    """Receive buffers reused across requests, each only once nothing else refers to it.

    Filling freshly allocated memory makes the kernel fault in (and zero) every page first:
    for a 400 MB push that costs as much as copying the bytes (docs/BENCHMARKS.md). The pool
    keeps the allocations it handed out (up to ``limit_bytes`` in all) and hands one out again
    only when its reference count shows that no array, view, tensor (DLPack and TensorFlow's
    numpy tensors hold a reference) or memoryview of it is alive any more -- so a buffer is
    never shared by two requests in flight, nor rewritten under gradients a sync round still
    holds, nor under arrays a client returned to its caller. ``limit_bytes=0``: no reuse.
    Thread-safe.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self.held = 0
        self.reused = 0  # how many take()s were served by an earlier buffer (tests, logs)
        self._free: Dict[int, list] = {}  # nbytes -> allocations (the base arrays)
        self._lock = threading.Lock()
        probe = [np.empty(1, np.uint8)]
        for raw in probe:  # the count of an allocation only this pool refers to
            self._idle_refs = sys.getrefcount(raw)

    def take(self, nbytes: int) -> np.ndarray:
        """An aligned uint8 array of ``nbytes``: an idle earlier one, or a new one."""
        with self._lock:
            for raw in self._free.get(nbytes, ()):
                if sys.getrefcount(raw) == self._idle_refs:
                    self.reused += 1
                    return raw[self._start(raw):self._start(raw) + nbytes]
            buffer = aligned_empty(nbytes)
            if nbytes and self.held + nbytes <= self.limit_bytes:
                self._free.setdefault(nbytes, []).append(buffer.base)
                self.held += nbytes
            return buffer

    @staticmethod
    def _start(raw: np.ndarray) -> int:
        return -raw.ctypes.data % ALIGNMENT


class _Partial:
    __slots__ = ("dtype", "shape", "buffer", "received", "checked", "finite")

    def __init__(self, dtype: np.dtype, shape: Tuple[int, ...], nbytes: int, check_finite: bool,
                 pool: Optional["BufferPool"] = None):
        self.dtype = dtype
        self.shape = shape
        # check_finite: bytes [0, checked) hold whole elements seen by np.isfinite, all finite
        # while ``finite``; None: not checked here (the store checks the finished array)
        self.checked = 0
        self.finite = True if check_finite and dtype.name in _FINITE_CHECKED else None
        # np.empty: no zero fill (every byte is written before finish() accepts the tensor),
        # and numpy maps large arrays on huge pages, so filling it faults 512x less often.
        # Aligned to 64 bytes, so that the optimizer can use the finished array in place
        # (store._as_tensor) instead of copying it into a tensor of its own. With a pool, a
        # buffer of an earlier request that nobody holds any more is reused instead: fresh
        # memory costs the kernel's page faults (zeroing) on the first write, as much as the copy.
        self.buffer = pool.take(nbytes) if pool is not None else aligned_empty(nbytes)
        self.received = 0


class TensorAssembler:
    """Collects the chunks of one stream into complete numpy arrays.

    ``max_bytes`` bounds the sum of the declared sizes in one stream (RESOURCE_EXHAUSTED
    beyond it); ``allowed_roles`` rejects chunks that do not belong to the RPC. ``expect``
    (name, role, dtype name, shape) checks a declaration against what is registered before
    anything is allocated (raises WireError); ``budget`` is the server-wide reservation that
    ``release()`` gives back. ``check_finite``: float tensors are checked for NaN / Inf chunk
    by chunk as they arrive, while the chunk is still in cache and while the next one is on
    the wire (``finite()`` reports the outcome), instead of in a pass of their own later.
    ``pool``: take the buffers from a BufferPool (reused once idle) instead of fresh memory.
    """

    def __init__(self, max_bytes: int, allowed_roles: frozenset,
                 expect: Optional[Callable[[str, int, str, Tuple[int, ...]], None]] = None,
                 budget: Optional[ByteBudget] = None, check_finite: bool = False,
                 pool: Optional[BufferPool] = None):
        self.max_bytes = max_bytes
        self.pool = pool
        self.allowed_roles = allowed_roles
        self.expect = expect
        self.budget = budget
        self.check_finite = check_finite
        self.declared_bytes = 0
        self.reserved = 0
        self._partial: Dict[Tuple[str, int], _Partial] = {}

    def release(self) -> None:
        """Give the reserved bytes back to the budget (the call is over)."""
        if self.budget is not None and self.reserved:
            self.budget.release(self.reserved)
        self.reserved = 0

    def add(self, chunk, data=None) -> int:
        """Check ``chunk`` and copy its bytes (``data`` if given, else ``chunk.data``) into
        place; returns the number of data bytes."""
        key = (chunk.name, chunk.role)
        if chunk.role not in self.allowed_roles:
            raise WireError(f"tensor {chunk.name!r}: role {chunk.role} is not allowed in this call")
        if not chunk.name:
            raise WireError("tensor chunk without a variable name")
        part = self._partial.get(key)
        if part is None:
            if chunk.offset != 0:
                raise WireError(
                    f"tensor {chunk.name!r}: first chunk starts at byte {chunk.offset}, not 0"
                )
            dtype = numpy_dtype(chunk.dtype)
            shape = tuple(int(d) for d in chunk.shape)
            nbytes = declared_nbytes(chunk.name, dtype, shape)
            if self.expect is not None:
                self.expect(chunk.name, chunk.role, chunk.dtype, shape)
            if self.declared_bytes + nbytes > self.max_bytes:
                raise WireError(
                    f"tensor {chunk.name!r} ({nbytes} bytes) takes this request past the "
                    f"server's limit of {self.max_bytes} bytes (--max-request-bytes)",
                    code="RESOURCE_EXHAUSTED",
                )
            if self.budget is not None:
                self.budget.acquire(nbytes, f"tensor {chunk.name!r}")
                self.reserved += nbytes
            self.declared_bytes += nbytes
            part = self._partial[key] = _Partial(dtype, shape, nbytes, self.check_finite, self.pool)
        elif chunk.offset != part.received:
            raise WireError(
                f"tensor {chunk.name!r}: chunk at byte {chunk.offset}, expected {part.received} "
                "(chunks must arrive in order, without gaps or repeats)"
            )
        elif chunk.dtype or chunk.shape:
            if chunk.dtype and numpy_dtype(chunk.dtype) != part.dtype:
                raise WireError(f"tensor {chunk.name!r}: dtype changed in the middle of the stream")
        if data is None:
            data = chunk.data  # read once: every read of a bytes field makes a new copy
        end = part.received + len(data)
        if end > len(part.buffer):
            raise WireError(
                f"tensor {chunk.name!r}: {end} bytes received, more than the "
                f"{len(part.buffer)} its dtype and shape declare"
            )
        if data:
            part.buffer[part.received:end] = np.frombuffer(data, np.uint8)
        part.received = end
        if part.finite:  # the whole elements received so far and not yet checked
            upto = end - end % part.dtype.itemsize
            if upto > part.checked:
                part.finite = bool(np.isfinite(part.buffer[part.checked:upto].view(part.dtype)).all())
                part.checked = upto
        return len(data)

    def finite(self) -> Dict[Tuple[str, int], bool]:
        """After ``finish()``: whether each tensor checked on arrival holds only finite values
        (tensors not checked here -- not floats, bfloat16, or check_finite off -- are absent)."""
        return {key: part.finite for key, part in self._partial.items()
                if part.finite is False or (part.finite and part.checked == len(part.buffer))}

    def finish(self) -> Dict[Tuple[str, int], np.ndarray]:
        """The complete tensors, keyed by (name, role); refuses truncated ones."""
        out = {}
        for (name, role), part in self._partial.items():
            if part.received != len(part.buffer):
                raise WireError(
                    f"tensor {name!r}: stream ended after {part.received} of "
                    f"{len(part.buffer)} bytes (truncated)"
                )
            out[(name, role)] = part.buffer.view(part.dtype).reshape(part.shape)  # no copy
        return out


def array_nbytes(array: Optional[np.ndarray]) -> int:
    return 0 if array is None else int(array.nbytes)
