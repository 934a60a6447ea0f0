"""Reading and checking what a client sends, and writing the tensor streams a shard answers.

A request is decoded and checked here completely -- chunk by chunk against the registered
variables, before any buffer is allocated for a declared tensor -- so that the calls that
change state (shard.py, rounds.py) only ever see a well-formed request. Refusals are
``PSError``s naming the gRPC status.

The tensor streams bypass protobuf's (de)serializers (``service.add_to_server``): a request
message arrives as the bytes gRPC received and ``split_message`` cuts the data out, copied once
into the tensor; a Pull answer is built by ``serialized_chunks``, one copy of the data.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import grpc
import numpy as np

from radam_dist.ps.admission import IdleStreams
from radam_dist.ps.errors import PSError, name_list
from radam_dist.ps.metrics import PSMetrics
from radam_dist.ps.options import ServeOptions
from radam_dist.ps.proto import pb
from radam_dist.ps.pushes import Gradient
from radam_dist.ps.shard import Shard
from radam_dist.ps.store import VariableSpec
from radam_dist.ps.tensors import (BufferPool, ByteBudget, TensorAssembler, TimedStream, WireError,
                                   serialized_chunks, split_message)

PUSH_ROLES = frozenset({pb.GRADIENT, pb.SPARSE_VALUES, pb.SPARSE_INDICES})
REGISTER_ROLES = frozenset({pb.VALUE})
Tensors = Dict[Tuple[str, int], np.ndarray]  # (name, role) -> array, as TensorAssembler.finish()


class Registration(NamedTuple):
    """A RegisterRequest, decoded and checked."""

    config_json: str
    specs: List[VariableSpec]
    values: Dict[str, np.ndarray]
    job_id: str
    placement: dict


class Wire:
    """One shard's tensor streams: reads and checks requests, writes values; counts the bytes.

    Owns the receive buffers (``receive_pool``), the idle-stream watch and the byte counters
    (its own lock: they are statistics, no other state depends on them). Reads the shard's
    variables to check declared tensors (``expect_push``), without the shard's Condition: the
    variables are fixed once registered, and the store is replaced only by the first
    registration."""

    def __init__(self, options: ServeOptions, shard: Shard, budget: ByteBudget, metrics: PSMetrics):
        self.options = options
        self.shard = shard
        self.budget = budget
        # Pushes decode into buffers of earlier pushes that nothing refers to any more (no page
        # faults on 400 MB of fresh memory per push); Register keeps fresh memory (its arrays
        # become the variables).
        self.receive_pool = BufferPool(options.receive_buffer_bytes)
        self.idle_streams = IdleStreams(options.stream_idle_timeout, metrics.streams_idle_cancelled)
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.bytes_sent = 0

    # -- checks of declared tensors (before any buffer exists) --------------------------------------
    def expect_push(self, name: str, role: int, dtype: str, shape: Tuple[int, ...]) -> None:
        """Refuse a declared gradient that does not fit the registered variable."""
        spec = self.shard.store.specs.get(name)
        if spec is None:
            raise WireError(f"gradient for unknown variable(s) {name_list([name])}", code="NOT_FOUND")
        if role == pb.SPARSE_INDICES:
            if dtype not in ("int32", "int64") or len(shape) != 1:
                raise WireError(f"sparse gradient of {name!r}: indices must be a 1-d int32/int64 "
                                f"array, got {dtype} of shape {shape}")
            return
        if dtype != spec.dtype:
            raise WireError(f"gradient of {name!r} has dtype {dtype}, the variable is {spec.dtype}")
        if role == pb.GRADIENT and tuple(shape) != tuple(spec.shape):
            raise WireError(f"gradient of {name!r} has shape {tuple(shape)}, the variable has "
                            f"{tuple(spec.shape)}")
        if role == pb.SPARSE_VALUES and (not spec.shape or tuple(shape[1:]) != tuple(spec.shape[1:])):
            raise WireError(f"sparse gradient of {name!r}: values have shape {tuple(shape)}, rows of "
                            f"the variable have shape {tuple(spec.shape[1:])}")

    def expect_register(self, name: str, role: int, dtype: str, shape: Tuple[int, ...]) -> None:
        """A second registration must declare exactly the registered variables."""
        store = self.shard.store
        if not store.registered:
            return  # the first registration defines the variables (bounded by the budget)
        spec = store.specs.get(name)
        if spec is None or spec.dtype != dtype or tuple(spec.shape) != tuple(shape):
            raise WireError(
                f"the variables differ from the registered ones: {name!r} {dtype}{list(shape)} is "
                "not registered" + ("" if spec is None else f" (registered: {spec.dtype}{list(spec.shape)})"),
                code="FAILED_PRECONDITION")

    # -- reading ------------------------------------------------------------------------------------
    def receive(self, request_iterator, header_field: str, roles: frozenset, context,
                expect: Optional[Callable[[str, int, str, Tuple[int, ...]], None]] = None,
                split: Optional[dict] = None, pool: Optional[BufferPool] = None,
                on_header: Optional[Callable[[Any], None]] = None, method: str = ""
                ) -> Tuple[Any, Tensors, TensorAssembler]:
        """Read a client stream: (header, {(name, role): array}, assembler). Raises PSError;
        the caller releases ``assembler`` (its reservation in the in-flight budget).

        The messages are the raw bytes gRPC received: ``split_message`` cuts out the data,
        which is copied once, straight into the tensor. (Messages already parsed work too.)
        ``split`` collects seconds spent waiting for the wire ("wire_in") and decoding
        ("decode"); ``pool``: where the tensors' buffers come from (fresh memory without);
        ``on_header`` checks the header before any tensor is read (a refusal then costs
        nothing). A stream that sends nothing for --stream-idle-timeout is cancelled
        (admission.IdleStreams)."""
        header = None
        assembler = TensorAssembler(self.options.max_request_bytes, roles, expect, self.budget,
                                    check_finite=True, pool=pool)
        wrap = pb.RegisterRequest if header_field == "RegisterHeader" else pb.PushRequest
        received = 0
        decoded = 0.0
        watched = self.idle_streams.watch(request_iterator, context, method or header_field)
        messages = TimedStream(watched)
        try:
            first = True
            for message in messages:
                start = time.perf_counter()
                if isinstance(message, (bytes, bytearray, memoryview)):
                    kind, message_header, chunk, data = split_message(pb, wrap, message)
                else:
                    kind = message.WhichOneof("kind")
                    message_header = message.header if kind == "header" else None
                    chunk, data = (message.chunk, None) if kind == "chunk" else (None, None)
                if first:
                    first = False
                    if kind != "header":
                        raise PSError("INVALID_ARGUMENT", f"the first message must be the {header_field}")
                    header = message_header
                    if on_header is not None:
                        on_header(header)
                    continue
                if kind != "chunk":
                    raise PSError("INVALID_ARGUMENT", "only one header per stream")
                received += assembler.add(chunk, data)
                decoded += time.perf_counter() - start
            if split is not None:
                split["wire_in"], split["decode"] = messages.waited, decoded
            if header is None:
                raise PSError("INVALID_ARGUMENT", f"empty stream: no {header_field}")
            tensors = assembler.finish()
        except WireError as err:
            assembler.release()
            refusal = PSError(err.code, str(err))
            refusal.header = header  # who sent it, for the log line
            raise refusal from err
        except grpc.RpcError as err:  # the client went away mid-stream (or was cut off idle)
            assembler.release()
            refusal = PSError("CANCELLED", f"stream interrupted: {err}")
            refusal.header = header  # who it was, for the log line
            raise refusal from err
        except PSError as err:
            assembler.release()
            err.header = header
            raise
        except BaseException:
            assembler.release()
            raise
        finally:
            watched.close()
        with self._lock:
            self.bytes_received += received
        return header, tensors, assembler

    def receive_register(self, request_iterator, context) -> Tuple[Any, Tensors, TensorAssembler]:
        """(RegisterHeader, values, assembler) of a Register stream."""
        return self.receive(request_iterator, "RegisterHeader", REGISTER_ROLES, context,
                            self.expect_register)

    def receive_push(self, request_iterator, context,
                     on_header: Optional[Callable[[Any], None]] = None,
                     split: Optional[dict] = None, method: str = "Push"
                     ) -> Tuple[Any, Tensors, TensorAssembler]:
        """(PushHeader, gradient tensors, assembler) of a Push / PushPull stream, into reused
        buffers; refused before anything is read while nothing is registered."""
        self.shard.check_registered()
        return self.receive(request_iterator, "PushHeader", PUSH_ROLES, context, self.expect_push,
                            split, self.receive_pool, on_header, method)

    # -- decoding -----------------------------------------------------------------------------------
    def registration(self, header, tensors: Tensors) -> Registration:
        """Check a RegisterRequest against this shard and decode its placement and variables."""
        opts = self.options
        if (header.num_shards or 1, header.shard_index) != (opts.num_shards, opts.shard_index):
            raise PSError(
                "FAILED_PRECONDITION",
                f"the client believes this is shard {header.shard_index} of {header.num_shards or 1}; "
                f"it is shard {opts.shard_index} of {opts.num_shards} (check the order of the targets)")
        try:
            placement = json.loads(header.placement_json) if header.placement_json else {}
        except json.JSONDecodeError as err:
            raise PSError("INVALID_ARGUMENT", f"placement_json is not JSON: {err}") from err
        if not isinstance(placement, dict):
            raise PSError("INVALID_ARGUMENT", "placement_json must be a JSON object")
        values = {name: array for (name, _), array in tensors.items()}
        specs = []
        for name in sorted(values):
            array = values[name]
            where = placement.get(name, {})
            try:
                specs.append(VariableSpec(name, array.dtype.name, tuple(array.shape),
                                          int(where.get("row_start", 0)),
                                          int(where.get("total_rows", array.shape[0] if array.ndim else 0))))
            except (TypeError, ValueError, AttributeError) as err:
                raise PSError("INVALID_ARGUMENT", f"placement of {name!r} is malformed: {err}") from err
            if array.size and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise PSError("INVALID_ARGUMENT", f"initial value of {name!r} holds NaN or Inf")
        return Registration(header.optimizer_config_json, specs, values, header.job_id, placement)

    @staticmethod
    def gradients(tensors: Tensors) -> Dict[str, Gradient]:
        """The gradients of a push's tensors: dense, or sparse as values + indices."""
        grads: Dict[str, Gradient] = {}
        names = {name for name, _ in tensors}
        for name in sorted(names):
            dense = tensors.get((name, pb.GRADIENT))
            values = tensors.get((name, pb.SPARSE_VALUES))
            indices = tensors.get((name, pb.SPARSE_INDICES))
            if dense is not None and (values is not None or indices is not None):
                raise PSError("INVALID_ARGUMENT", f"variable {name!r}: both a dense and a sparse gradient")
            if dense is not None:
                grads[name] = Gradient(dense)
            elif values is None or indices is None:
                raise PSError("INVALID_ARGUMENT",
                              f"variable {name!r}: a sparse gradient needs both values and indices")
            else:
                grads[name] = Gradient(values, indices)
        return grads

    @staticmethod
    def known_finite(finite: Optional[dict]) -> Dict[str, bool]:
        """Per variable, whether its values were all finite (TensorAssembler.finite(), checked
        on arrival); absent where not checked there."""
        return {name: ok for (name, role), ok in (finite or {}).items()
                if role in (pb.GRADIENT, pb.SPARSE_VALUES)}

    # -- writing ------------------------------------------------------------------------------------
    def stream_values(self, header_kwargs: dict, names: List[str], values: Dict[str, np.ndarray],
                      split: Optional[dict] = None) -> Iterator[bytes]:
        """Serialized PullResponses: the header, then the chunks of each value, built by
        ``serialized_chunks`` (one copy of the data; gRPC sends bytes as they are, see
        ``add_to_server``). ``split`` gets the seconds spent encoding ("encode")."""
        clock = time.perf_counter
        t0 = clock()
        encode = 0.0
        yield pb.PullResponse(header=pb.PullHeader(**header_kwargs)).SerializeToString()
        sent = 0
        for name in names:
            chunks = serialized_chunks(pb, name, pb.VALUE, values[name], pb.PullResponse,
                                       self.options.chunk_bytes)
            while True:
                t = clock()
                raw = next(chunks, None)
                encode += clock() - t
                if raw is None:
                    break
                yield raw
            sent += values[name].nbytes
        # Let go of the snapshot now: while a view of a variable lives, the next step must copy
        # the variable's buffer before updating it (copy-on-write).
        values.clear()
        with self._lock:
            self.bytes_sent += sent
        if split is not None:
            split["encode"], split["wire_out"] = encode, clock() - t0 - encode

    def byte_counts(self) -> Dict[str, int]:
        with self._lock:
            return dict(bytes_received=self.bytes_received, bytes_sent=self.bytes_sent)
