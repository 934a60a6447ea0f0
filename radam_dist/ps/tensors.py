"""Tensors on the wire: raw bytes + dtype + shape, cut into chunks and put back together.

A gRPC message is limited (4 MiB by default); a parameter of 100M floats is 400 MB. Every
tensor therefore travels as a sequence of ``TensorChunk`` messages. The receiver
(``TensorAssembler``) checks each chunk against the declared dtype and shape, refuses
oversized, overlapping or out-of-order data, and at the end of the stream refuses truncated
tensors, so a damaged stream never reaches the optimizer.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import numpy as np

# Dtypes accepted on the wire (names as numpy spells them).
WIRE_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8", "int8", "bool"}
)
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: far below the message limit, few enough messages


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


def chunk_tensor(pb, name: str, role: int, array: np.ndarray,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, wrap=None) -> Iterator:
    """Yield ``pb.TensorChunk`` messages for ``array`` (always at least one, even if empty).

    With ``wrap`` (a message class with a ``chunk`` field, e.g. ``pb.PushRequest``) the chunks
    are built inside wrapper messages directly, saving a copy of every byte.
    """
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
        chunk.data = view[offset:end].tobytes()
        if first:
            chunk.dtype = dtype_name(array)
            chunk.shape.extend(int(d) for d in array.shape)
            first = False
        yield message
        offset = end


class _Partial:
    __slots__ = ("dtype", "shape", "buffer", "received")

    def __init__(self, dtype: np.dtype, shape: Tuple[int, ...], nbytes: int):
        self.dtype = dtype
        self.shape = shape
        self.buffer = bytearray(nbytes)
        self.received = 0


class TensorAssembler:
    """Collects the chunks of one stream into complete numpy arrays.

    ``max_bytes`` bounds the sum of the declared sizes in one stream (RESOURCE_EXHAUSTED
    beyond it); ``allowed_roles`` rejects chunks that do not belong to the RPC.
    """

    def __init__(self, max_bytes: int, allowed_roles: frozenset):
        self.max_bytes = max_bytes
        self.allowed_roles = allowed_roles
        self.declared_bytes = 0
        self._partial: Dict[Tuple[str, int], _Partial] = {}

    def add(self, chunk) -> None:
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
            if any(d < 0 for d in shape):
                raise WireError(f"tensor {chunk.name!r}: negative dimension in shape {shape}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
            if self.declared_bytes + nbytes > self.max_bytes:
                raise WireError(
                    f"tensor {chunk.name!r} ({nbytes} bytes) takes this request past the "
                    f"server's limit of {self.max_bytes} bytes (--max-request-bytes)",
                    code="RESOURCE_EXHAUSTED",
                )
            self.declared_bytes += nbytes
            part = self._partial[key] = _Partial(dtype, shape, nbytes)
        elif chunk.offset != part.received:
            raise WireError(
                f"tensor {chunk.name!r}: chunk at byte {chunk.offset}, expected {part.received} "
                "(chunks must arrive in order, without gaps or repeats)"
            )
        elif chunk.dtype or chunk.shape:
            if chunk.dtype and numpy_dtype(chunk.dtype) != part.dtype:
                raise WireError(f"tensor {chunk.name!r}: dtype changed in the middle of the stream")
        end = part.received + len(chunk.data)
        if end > len(part.buffer):
            raise WireError(
                f"tensor {chunk.name!r}: {end} bytes received, more than the "
                f"{len(part.buffer)} its dtype and shape declare"
            )
        part.buffer[part.received:end] = chunk.data
        part.received = end

    def finish(self) -> Dict[Tuple[str, int], np.ndarray]:
        """The complete tensors, keyed by (name, role); refuses truncated ones."""
        out = {}
        for (name, role), part in self._partial.items():
            if part.received != len(part.buffer):
                raise WireError(
                    f"tensor {name!r}: stream ended after {part.received} of "
                    f"{len(part.buffer)} bytes (truncated)"
                )
            out[(name, role)] = np.frombuffer(part.buffer, dtype=part.dtype).reshape(part.shape)
        return out


def array_nbytes(array: Optional[np.ndarray]) -> int:
    return 0 if array is None else int(array.nbytes)
