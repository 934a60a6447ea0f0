"""The variables of one shard and the optimizer that updates them.

Parameters are ``keras.Variable``s; the optimizer is a real ``radam_dist.RectifiedAdam``
(optionally inside ``radam_dist.Lookahead``) built from the registered config, and a step is
its ``apply`` under ``tf.function``. So the server runs the project's one implementation of
the RAdam math (radam_math), not a copy of it.

Nothing here is thread-safe; ``shard.Shard`` serialises access with its Condition.
Validation (``check_gradients``) is separate from ``apply`` so that a request is refused
before anything is touched.
"""

from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from radam_dist.ps import optimizer_config
from radam_dist.ps.errors import PSError, name_list
from radam_dist.ps.pushes import Gradient
from radam_dist.ps.tensors import ALIGNMENT

log = logging.getLogger(__name__)

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


class VariableSpec(NamedTuple):
    name: str
    dtype: str
    shape: Tuple[int, ...]
    row_start: int = 0
    total_rows: int = 0  # rows of the whole (unsplit) variable; 0 for a 0-d variable


def specs_to_json(specs: Sequence[VariableSpec]) -> list:
    return [dict(s._asdict(), shape=list(s.shape)) for s in specs]


def specs_from_json(items: list) -> List[VariableSpec]:
    return [VariableSpec(**dict(i, shape=tuple(i["shape"]))) for i in items]


_SHARED_DTYPES = frozenset({"float16", "float32", "float64"})


def _as_tensor(array: np.ndarray) -> tf.Tensor:
    """A tensor for a dense gradient: the array's own memory where that is safe (C-contiguous,
    aligned the way TensorFlow's kernels expect, a dtype DLPack carries), else a copy.

    The received gradient is not touched again while the step runs, and the tensor keeps the
    array alive, so sharing changes no value; it saves one pass over the gradient."""
    if (array.dtype.name in _SHARED_DTYPES and array.ndim and array.size and array.flags.c_contiguous
            and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0):
        try:
            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        except (BufferError, TypeError, ValueError, RuntimeError):  # older numpy / TF: copy
            pass
    return tf.constant(array)


class ParameterStore:
    """Variables + optimizer + version counter of one shard."""

    def __init__(self) -> None:
        self.config_json: Optional[str] = None  # canonical JSON, set at registration
        self.job_id: str = ""
        self.specs: Dict[str, VariableSpec] = {}
        self.version = 0  # number of updates applied since registration
        self._vars: Dict[str, keras.Variable] = {}
        self._order: List[str] = []
        self.optimizer: Optional[keras.optimizers.Optimizer] = None
        self._functions: dict = {}

    # -- registration ---------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        return self.optimizer is not None

    def check_registration(self, config, specs: Sequence[VariableSpec], job_id: str = "") -> str:
        """Validate a registration; returns the canonical config. Raises PSError."""
        canonical = optimizer_config.canonical_json(config)
        if not specs:
            raise PSError("INVALID_ARGUMENT", "registration without variables")
        for spec in specs:
            if spec.dtype not in FLOAT_DTYPES:
                raise PSError(
                    "INVALID_ARGUMENT",
                    f"variable {spec.name!r} has dtype {spec.dtype}; trainable parameters must be "
                    f"one of {sorted(FLOAT_DTYPES)}",
                )
        if not self.registered:
            return canonical
        if job_id != self.job_id:  # "" is a job id like any other: no hole for "" vs "x"
            raise PSError(
                "FAILED_PRECONDITION",
                f"this server holds job {self.job_id!r}; refusing a registration for job {job_id!r} "
                "(a registration must carry exactly the job id of the first one)",
            )
        if canonical != self.config_json:
            raise PSError(
                "FAILED_PRECONDITION",
                "a different optimizer config is already registered (one config per job): "
                f"registered {self.config_json}, got {canonical}",
            )
        mine = {(s.name, s.dtype, tuple(s.shape)) for s in self.specs.values()}
        theirs = {(s.name, s.dtype, tuple(s.shape)) for s in specs}
        if mine != theirs:
            raise PSError(
                "FAILED_PRECONDITION",
                "the variables differ from the registered ones: "
                f"only registered {name_list(sorted(map(str, mine - theirs)), 3)}, only in this "
                f"request {name_list(sorted(map(str, theirs - mine)), 3)}",
            )
        return canonical

    def create(self, canonical_config: str, specs: Sequence[VariableSpec],
               values: Dict[str, np.ndarray], job_id: str = "") -> None:
        """Create the variables and build the optimizer (after ``check_registration``)."""
        optimizer = optimizer_config.build_optimizer(canonical_config)
        variables = {}
        order = sorted(s.name for s in specs)
        for i, name in enumerate(order):
            value = values[name]
            # Keras variable names may not contain '/', so they are numbered; we map names.
            variables[name] = keras.Variable(value, dtype=value.dtype.name, name=f"ps_var_{i}")
        optimizer.build([variables[n] for n in order])
        self.optimizer = optimizer
        self.config_json = canonical_config
        self.job_id = job_id
        self.specs = {s.name: s for s in specs}
        self._vars = variables
        self._order = order
        self._functions = {}
        self.version = 0

    # -- reading ------------------------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return list(self._order)

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy()) if self.optimizer is not None else 0

    @property
    def num_parameters(self) -> int:
        return int(sum(np.prod(s.shape, dtype=np.int64) for s in self.specs.values()))

    def check_names(self, names: Sequence[str]) -> List[str]:
        if not self.registered:
            raise PSError("FAILED_PRECONDITION", "no variables are registered on this server yet")
        unknown = [n for n in names if n not in self._vars]
        if unknown:
            raise PSError("NOT_FOUND", f"unknown variable(s) {name_list(unknown)}; known: "
                                       f"{name_list(self._order)}")
        return list(names) if names else list(self._order)

    def read(self, names: Sequence[str]) -> Dict[str, np.ndarray]:
        """A consistent snapshot of ``names`` without copying: read-only numpy views of the
        tensors the variables hold now. The views keep those buffers alive, and TensorFlow
        copies a variable's buffer before updating it while anyone else holds it, so a later
        step never shows through (tests/test_ps_zero_copy.py)."""
        out = {}
        for n in names:
            # (np.asarray of the variable itself would copy: it goes through .numpy())
            view = np.asarray(tf.convert_to_tensor(self._vars[n])).view()
            view.flags.writeable = False
            out[n] = view
        return out

    # -- updates ------------------------------------------------------------------------------
    def check_gradients(self, grads: Dict[str, Gradient], nonfinite: str = "reject",
                        known_finite: Optional[Dict[str, bool]] = None) -> bool:
        """Validate a push against the variables. Returns False when the push holds a
        non-finite value and ``nonfinite == "skip"``; raises PSError for everything else.

        ``known_finite``: whether the values of a gradient are all finite, where that is
        already known (checked chunk by chunk on arrival, TensorAssembler); the others are
        checked here."""
        if not self.registered:
            raise PSError("FAILED_PRECONDITION", "push before registration: call Register first")
        if not grads:  # allowed: a sync worker that has nothing for this shard still counts
            return True
        unknown = sorted(n for n in grads if n not in self._vars)
        if unknown:
            raise PSError("NOT_FOUND", f"gradient for unknown variable(s) {name_list(unknown)}")
        finite = True
        for name, grad in grads.items():
            spec = self.specs[name]
            values = grad.values
            if values.dtype.name != spec.dtype:
                raise PSError(
                    "INVALID_ARGUMENT",
                    f"gradient of {name!r} has dtype {values.dtype.name}, the variable is {spec.dtype}",
                )
            if grad.is_sparse:
                indices = grad.indices
                if indices.dtype.name not in ("int32", "int64") or indices.ndim != 1:
                    raise PSError(
                        "INVALID_ARGUMENT",
                        f"sparse gradient of {name!r}: indices must be a 1-d int32/int64 array, got "
                        f"{indices.dtype.name} of shape {indices.shape}",
                    )
                if not spec.shape:
                    raise PSError("INVALID_ARGUMENT", f"sparse gradient for the scalar {name!r}")
                if values.shape != (indices.shape[0],) + tuple(spec.shape[1:]):
                    raise PSError(
                        "INVALID_ARGUMENT",
                        f"sparse gradient of {name!r}: values have shape {values.shape}, expected "
                        f"{(indices.shape[0],) + tuple(spec.shape[1:])} for {indices.shape[0]} indices",
                    )
                if indices.size and (indices.min() < 0 or indices.max() >= spec.shape[0]):
                    bad = indices[(indices < 0) | (indices >= spec.shape[0])]
                    raise PSError(
                        "INVALID_ARGUMENT",
                        f"sparse gradient of {name!r}: row indices {bad[:5].tolist()} out of range "
                        f"[0, {spec.shape[0]})",
                    )
            elif values.shape != tuple(spec.shape):
                raise PSError(
                    "INVALID_ARGUMENT",
                    f"gradient of {name!r} has shape {values.shape}, the variable has {tuple(spec.shape)}",
                )
            finite_values = (known_finite or {}).get(name)
            if finite_values is None and values.size:
                finite_values = bool(np.isfinite(values.astype(np.float32, copy=False)
                                                 if spec.dtype == "bfloat16" else values).all())
            if values.size and not finite_values:
                if nonfinite != "skip":
                    raise PSError(
                        "INVALID_ARGUMENT",
                        f"gradient of {name!r} holds NaN or Inf (server runs with --nonfinite=reject)",
                    )
                finite = False
        return finite

    def apply(self, grads: Dict[str, Gradient]) -> int:
        """One optimizer step with already-validated gradients; returns the new version.

        Without gradients (a sync round whose pushes carry nothing for this shard, or only
        skipped non-finite ones) the version advances and no step is taken, so every shard
        counts the same rounds."""
        if not grads:
            self.version += 1
            return self.version
        names = tuple(sorted(grads))
        fn = self._functions.get(names)
        if fn is None:
            variables = [self._vars[n] for n in names]
            optimizer = self.optimizer

            def step(gradients):
                optimizer.apply(gradients, variables)

            fn = self._functions[names] = tf.function(step, reduce_retracing=True)
        tensors = []
        for name in names:
            grad = grads[name]
            if grad.is_sparse:
                tensors.append(tf.IndexedSlices(
                    tf.constant(grad.values),
                    tf.constant(grad.indices.astype(np.int64, copy=False)),
                    tf.constant(self.specs[name].shape, dtype=tf.int64),
                ))
            else:
                tensors.append(_as_tensor(grad.values))
        fn(tensors)
        self.version += 1
        return self.version

    # -- state for checkpoints (storage/FORMATS.md, "Checkpoint": the array keys) ------------
    def optimizer_variables(self) -> list:
        return list(self.optimizer.variables)

    def export_state(self) -> Tuple[dict, Dict[str, np.ndarray]]:
        """(metadata, arrays) holding parameters, every optimizer variable and the version."""
        arrays = {f"param/{n}": self._vars[n].value.numpy() for n in self._order}
        opt_meta = []
        for i, var in enumerate(self.optimizer_variables()):
            value = np.asarray(var.value.numpy() if hasattr(var, "value") else var.numpy())
            arrays[f"opt/{i}"] = value
            opt_meta.append({"path": var.path, "shape": list(value.shape), "dtype": value.dtype.name})
        meta = {
            "version": self.version,
            "step": self.step,
            "config_json": self.config_json,
            "job_id": self.job_id,
            "variables": specs_to_json(self.specs.values()),
            "optimizer_variables": opt_meta,
        }
        return meta, arrays

    def import_state(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        """Rebuild from ``export_state`` output (a fresh store)."""
        specs = specs_from_json(meta["variables"])
        values = {s.name: arrays[f"param/{s.name}"] for s in specs}
        self.create(meta["config_json"], specs, values, meta.get("job_id", ""))
        opt_vars = self.optimizer_variables()
        saved = meta["optimizer_variables"]
        if len(saved) != len(opt_vars):
            raise ValueError(f"checkpoint holds {len(saved)} optimizer variables, the optimizer {len(opt_vars)}")
        for i, (var, info) in enumerate(zip(opt_vars, saved)):
            if var.path != info["path"] or list(var.shape) != info["shape"]:
                raise ValueError(f"optimizer variable {i}: checkpoint has {info}, optimizer {var.path} {var.shape}")
        for i, var in enumerate(opt_vars):
            var.assign(arrays[f"opt/{i}"])
        self.version = int(meta["version"])

