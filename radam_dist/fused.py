"""The fast path of an optimizer step: many dense RAdam updates in one XLA computation.

Why: a step is memory traffic (28 bytes per float32 parameter: read var, grad, m, v; write
var, m, v). Run one TF op at a time, ``radam_math.apply_dense`` makes about 19 passes over
each variable; compiled by XLA it becomes three loops (m, v, then the variable), run one
variable after another so that the variable's loop finds m and v still in cache, and one
compiled call covers ``MAX_GROUP`` variables, so a model of 1,000 small variables pays 32
dispatches, not 19,000. Lookahead's synchronisation (``pull_back``) takes the same path.

The math is still ``radam_math.apply_dense``, traced inside ``tf.function(jit_compile=True)``;
``radam_math._rounded`` keeps XLA from contracting products into FMAs, so the results are
bit-for-bit those of the per-variable path (``tests/test_fused_equivalence.py``); inside a
caller's own jit_compile, where XLA contracts freely, they agree to round-off. Sparse
gradients stay on the per-variable path.

Under MirroredStrategy and MultiWorkerMirroredStrategy (``StepPlan.mirrored_devices``) every local
device updates its own copies of the variables: one set of compiled chunks per device, placed
there (``device=``), fed that device's copy of the all-reduced gradients and of the step
scalars, bit-for-bit the per-variable ``extended.update`` (``tests/test_fused_strategies.py``).
Under a single-process MirroredStrategy the chunks get every replica's gradient instead and
add them in replica order themselves (``distribute.gradient_sums.all_reduce_or_defer``, ``_summed``).
ParameterServerStrategy keeps the per-variable path: its variables live on the servers.

Which update takes the chunks and which the one-pass kernel (``radam_dist/native``) is the
step plan's choice (``radam_dist/step``); this module is the chunks' backend.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from radam_dist import radam_math

ENV_SWITCH = "RADAM_DIST_FUSED"  # 0: no chunks, per-variable everywhere (the step plan reads it)

# Variables per compiled computation. XLA's compile time grows faster than linearly with
# the number of variables in one computation, and on CPU a chunk of tens runs as fast per
# variable as one big computation.
MAX_GROUP = 32


# A variable of at least this many elements waits for the previous one in its chunk
# (``_after``). Its four arrays (var, grad, m, v) then fill a 1 MiB L2 cache, and reading m
# and v back while they are still cached pays; smaller variables stay in cache whatever
# the order, and ordering them only costs XLA its freedom to overlap them (measured by
# bench/fused_order.py; docs/BENCHMARKS.md, "Figures behind the code").
ORDER_MIN_ELEMENTS = 1 << 16


class DenseUpdate(NamedTuple):
    """One variable's dense update: the tensors ``radam_math.apply_dense`` takes."""

    var: tf.Variable
    grad: tf.Tensor  # or a tuple: the replicas' gradients, summed in the chunk (``_summed``)
    m: tf.Variable
    v: tf.Variable
    vhat: Optional[tf.Variable]
    scalars: radam_math.StepScalars


def is_dense_float(grad, var) -> bool:
    """Dense gradient of a floating-point variable: what the compiled update handles."""
    return (
        grad is not None
        and not isinstance(grad, tf.IndexedSlices)
        and var.dtype.is_floating
    )


def _xla_compiled(fn):
    """``tf.function(fn, jit_compile=True)``, one per chunk shape and traced once.

    TF warns about "frequent retracing" when five functions made from the same code trace
    in a row, which is every model with five different chunks; the warning would send users
    hunting for a mistake that is not there, so it is switched off for these functions
    (the flag TF sets on the functions it restores from a SavedModel).
    """
    compiled = tf.function(fn, jit_compile=True, autograph=False)
    compiled._omit_frequent_tracing_warning = True  # pylint: disable=protected-access
    return compiled


def _compiled_dense_update():
    """A fresh XLA-compiled function over lists of variables, slots and gradients.

    Variables are arguments, not captures, so chunks of the same shapes share one trace and
    one XLA compilation (a model's repeated blocks compile once). Flat lists, because TF's
    call of a function costs more per nested argument. Each update waits for the
    previous one (``_after``) when it is large: XLA's scheduler would otherwise run every
    m and v pass of the chunk before the first variable pass, which then re-reads m and v
    from memory instead of from the cache they were just written through.
    """

    @_xla_compiled
    def apply_chunk(variables, ms, vs, vhats, grads, scalars):
        for i, var in enumerate(variables):
            vhat = vhats[i] if vhats else None
            grad = _summed(grads[i])
            if i > 0 and (var.shape.num_elements() or 0) >= ORDER_MIN_ELEMENTS:
                grad = _after(grad, variables[i - 1])
            radam_math.apply_dense(var, grad, ms[i], vs[i], vhat, scalars)

    return apply_chunk


def _summed(grad):
    """A gradient, or the replicas' parts of one whose cross-replica sum was deferred to the
    update (``distribute.gradient_sums.all_reduce_or_defer``): added here in replica order, inside the
    compiled chunk, which saves writing and reading back the sum."""
    if not isinstance(grad, (tuple, list)):
        return grad
    return radam_math.sum_in_replica_order(grad)


def _grad_signature(grad) -> tuple:
    parts = grad if isinstance(grad, (tuple, list)) else (grad,)
    return (len(parts), parts[0].dtype.name)


def _after(tensor: tf.Tensor, previous: tf.Variable) -> tf.Tensor:
    """``tensor``, bit for bit, but computed only once ``previous`` has its new value.

    The order has to be a data dependency: XLA's CPU pipeline (TF 2.21) removed the
    optimization barriers we tried and kept its own schedule. So this is ``tensor - z``,
    with z a +0.0 made from the first element of ``previous`` by two logical shifts
    (``bits >> 31 >> 1``) that XLA does not fold. Subtracting +0.0 is exact for every value,
    -0.0 included; the chain runs within a chunk, so XLA can still overlap chunks.
    """
    if previous.shape.num_elements() == 0:
        return tensor
    first = tf.reshape(tf.convert_to_tensor(previous), [-1])[0]
    bits = tf.bitcast(tf.cast(first, tf.float32), tf.uint32)
    zero = tf.bitwise.right_shift(tf.bitwise.right_shift(bits, 31), 1)
    return tensor - tf.cast(zero, tensor.dtype)


def _compiled_pull_back():
    """A fresh XLA-compiled Lookahead synchronisation over lists of fast and slow weights."""

    @_xla_compiled
    def pull_back_chunk(variables, slows, slow_step_size, one):
        for var, slow in zip(variables, slows):
            radam_math.lookahead_pull_back(var, slow, slow_step_size, one)

    return pull_back_chunk


def _shapes(variables) -> tuple:
    return tuple((v.dtype.name, tuple(v.shape)) for v in variables)


def _in_chunks(items: Sequence, cache: dict, key, compile_fn, call) -> None:
    """Run ``call(compiled, chunk)`` over ``items`` in chunks of ``MAX_GROUP``.

    Items are ordered by their variable's dtype and shape (the updates are independent), so
    that chunks repeat and reuse compilations; ``key(chunk)`` names a chunk's compilation in
    ``cache``, and ``compile_fn()`` makes it the first time.
    """
    items = sorted(items, key=lambda item: (item[0].dtype.name, tuple(item[0].shape)))
    for start in range(0, len(items), MAX_GROUP):
        chunk = items[start : start + MAX_GROUP]
        compiled = cache.get(key(chunk))
        if compiled is None:
            compiled = cache[key(chunk)] = compile_fn()
        call(compiled, chunk)


def _group_key(update: DenseUpdate) -> Tuple[int, bool, bool]:
    # Variants of one step's scalars (weight decay switched off for some variables) share
    # their tensors; the learning-rate tensor identifies the step and the dtype.
    s = update.scalars
    return id(s.lr), s.has_weight_decay, update.vhat is not None


def apply_dense(updates: Sequence[DenseUpdate], cache: Optional[dict] = None,
                device: Optional[str] = None) -> None:
    """Apply every update in compiled chunks, grouped by shared step scalars. An update of a
    ``radam_math.Rows`` (a ZeRO replica's rows) gets its new value in ``update.var.value``.

    ``cache`` (the optimizer's) keeps the compiled functions from step to step. ``device``
    (a mirror's copies, a replica's rows) places the chunks there, each device with
    compilations of its own.
    """
    cache = {} if cache is None else cache
    with placed(device):
        variables = [u for u in updates if not isinstance(u.var, radam_math.Rows)]
        rows = [u for u in updates if isinstance(u.var, radam_math.Rows)]
        if variables:
            _apply_dense(variables, cache, device)
        if rows:
            _apply_dense_rows(rows, cache, device)


def placed(device: Optional[str]):
    """``tf.device(device)``, or no scope for None."""
    # tf.device(None) would clear the caller's device scope inside a tf.function.
    return contextlib.nullcontext() if device is None else tf.device(device)


def _apply_dense(updates: Sequence[DenseUpdate], cache: dict, device: Optional[str]) -> None:
    groups: Dict[Tuple[int, bool, bool], List[DenseUpdate]] = {}
    for update in updates:
        groups.setdefault(_group_key(update), []).append(update)
    for group in groups.values():
        scalars = group[0].scalars

        def call(compiled, chunk, scalars=scalars):
            compiled(
                [u.var for u in chunk],
                [u.m for u in chunk],
                [u.v for u in chunk],
                [u.vhat for u in chunk] if chunk[0].vhat is not None else [],
                [u.grad for u in chunk],
                scalars,
            )

        def key(chunk, variant=(scalars.has_weight_decay, group[0].vhat is not None)):
            return ("radam", device) + variant + tuple(
                (u.var.dtype.name, tuple(u.var.shape)) + _grad_signature(u.grad) for u in chunk)

        _in_chunks(group, cache, key, _compiled_dense_update, call)


def pull_back(
    pairs: Sequence[Tuple[tf.Variable, tf.Variable]],
    slow_step_size: float,
    one: tf.Tensor,
    cache: Optional[dict] = None,
    device: Optional[str] = None,
) -> None:
    """Lookahead's synchronisation (``radam_math.lookahead_pull_back``) for every
    (fast, slow) pair, in compiled chunks: one pass over each pair instead of five TF kernels.

    ``one`` is a runtime 1.0 (see ``radam_math._rounded``) and alpha a runtime argument,
    which keeps the result bit-for-bit that of the per-variable path. ``device``: as in
    ``apply_dense``.
    """
    cache = {} if cache is None else cache
    with placed(device):
        alpha = tf.constant(slow_step_size, tf.float32)
        _in_chunks(
            pairs, cache,
            key=lambda chunk: ("lookahead", device) + _shapes(var for var, _ in chunk),
            compile_fn=_compiled_pull_back,
            call=lambda compiled, chunk: compiled(
                [var for var, _ in chunk], [slow for _, slow in chunk], alpha, one),
        )


# -- ZeRO-1: one replica's chunk of rows (radam_dist/distribute/zero.py) ----------------------------------
def _compiled_rows_update():
    """A fresh XLA-compiled function over a replica's chunks of rows: like ``_compiled_dense_update``,
    but the variables are row tensors (the replica's chunk of each variable, a transient
    value, see ``radam_math.Rows``); returns their new values."""

    @_xla_compiled
    def apply_rows_chunk(rows, ms, vs, vhats, grads, scalars):
        out = []
        for i, value in enumerate(rows):
            grad = grads[i]
            if i > 0 and (value.shape.num_elements() or 0) >= ORDER_MIN_ELEMENTS:
                grad = _after(grad, out[-1])
            work = radam_math.Rows(value)
            radam_math.apply_dense(work, grad, ms[i], vs[i], vhats[i] if vhats else None,
                                   scalars)
            out.append(work.value)
        return out

    return apply_rows_chunk


def _apply_dense_rows(updates: Sequence[DenseUpdate], cache: dict,
                      device: Optional[str]) -> None:
    """ZeRO-1's local update in compiled chunks: ``radam_math.apply_dense`` on each chunk's
    rows (``update.var``, a ``radam_math.Rows``: its value is replaced by the new rows), its
    gradient rows and its m / v / vhat slot copies. Bit for bit the per-variable path's."""
    groups: Dict[Tuple[int, bool, bool], List[DenseUpdate]] = {}
    for update in updates:
        groups.setdefault(_group_key(update), []).append(update)
    for (_, has_decay, has_vhat), group in groups.items():

        def call(compiled, chunk, has_vhat=has_vhat):
            new = compiled([u.var.value for u in chunk], [u.m for u in chunk],
                           [u.v for u in chunk], [u.vhat for u in chunk] if has_vhat else [],
                           [u.grad for u in chunk], chunk[0].scalars)
            for u, value in zip(chunk, new):
                u.var.value = value

        def key(chunk, variant=(has_decay, has_vhat)):
            return ("radam-rows", device) + variant + tuple(
                (u.var.dtype.name, tuple(u.var.shape), u.grad.dtype.name) for u in chunk)

        _in_chunks(group, cache, key, _compiled_rows_update, call)
