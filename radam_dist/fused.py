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

Under MirroredStrategy and MultiWorkerMirroredStrategy (``mirrored_devices``) every local
device updates its own copies of the variables: one set of compiled chunks per device, placed
there (``device=``), fed that device's copy of the all-reduced gradients and of the step
scalars, bit-for-bit the per-variable ``extended.update`` (``tests/test_fused_strategies.py``).
Under a single-process MirroredStrategy the chunks get every replica's gradient instead and
add them in replica order themselves (``aggregation.all_reduce_or_defer``, ``_summed``).
ParameterServerStrategy keeps the per-variable path: its variables live on the servers.

On CPU devices ``apply_dense`` hands float32 / float64 updates to the one-pass kernel
(``radam_dist/native``: one loop, 28 bytes per parameter, the same bits) where it is built;
the rest (16-bit variables, GPUs, a caller's jit_compile, ``RADAM_DIST_NATIVE=0``) take the
chunks.

Set ``RADAM_DIST_FUSED=0`` in the environment to take the per-variable path everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from radam_dist import native, radam_math
from radam_dist._env import switched_on

ENV_SWITCH = "RADAM_DIST_FUSED"

# Variables per compiled computation. XLA's compile time grows faster than linearly with
# the number of variables in one computation (1,000 small ones: about a minute), and on
# CPU a chunk of tens runs as fast per variable as one big computation.
MAX_GROUP = 32


# A variable of at least this many elements waits for the previous one in its chunk
# (``_after``). Its four arrays (var, grad, m, v) then fill a 1 MiB L2 cache, and reading m
# and v back while they are still cached pays; smaller variables stay in cache whatever
# the order, and ordering them only costs XLA its freedom to overlap them (1,000 small
# variables under jit_compile: 1.09x slower when all were ordered, bench/fused_order.py).
ORDER_MIN_ELEMENTS = 1 << 16


class DenseUpdate(NamedTuple):
    """One variable's dense update: the tensors ``radam_math.apply_dense`` takes."""

    var: tf.Variable
    grad: tf.Tensor  # or a tuple: the replicas' gradients, summed in the chunk (``_summed``)
    m: tf.Variable
    v: tf.Variable
    vhat: Optional[tf.Variable]
    scalars: radam_math.StepScalars


def enabled() -> bool:
    """False when the environment switched the fast path off (``RADAM_DIST_FUSED=0``)."""
    return switched_on(ENV_SWITCH)


def applicable(distribution) -> bool:
    """The fast path serves the default (no tf.distribute) strategy here; under
    MirroredStrategy / MWMS see ``mirrored_devices``."""
    return enabled() and not tf.distribute.has_strategy() and (
        distribution is None or distribution is tf.distribute.get_strategy()
    )


def mirrored_devices(distribution) -> Optional[Tuple[str, ...]]:
    """The local devices whose copies the update writes itself, or None (per-variable path).

    Only MirroredStrategy and MultiWorkerMirroredStrategy in cross-replica context (inside
    the optimizer's merge_call) qualify: there every variable is a mirror with one copy per
    local device, and ``extended.update`` would run the per-variable update on each copy in
    turn. Elsewhere (ParameterServerStrategy, whose variables live on the servers; a replica
    context without merge_call, as under XLA on GPUs) the per-variable path stays.
    """
    from tensorflow.python.distribute import mirrored_strategy  # pylint: disable=import-outside-toplevel

    if (not enabled() or distribution is None or not tf.distribute.in_cross_replica_context()
            or not isinstance(distribution.extended, mirrored_strategy.MirroredExtended)):
        return None
    return tuple(distribution.extended.worker_devices)


def local_value(distribution, value, index: int):
    """Device ``index``'s component of ``value`` (a PerReplica / Mirrored value from
    merge_call), or ``value`` itself where it is the same on every device."""
    if isinstance(value, tf.distribute.DistributedValues):
        return distribution.experimental_local_results(value)[index]
    return value


def local_scalars(distribution, scalars: radam_math.StepScalars, index: int):
    """The step scalars of device ``index`` (each field its component there)."""
    return radam_math.StepScalars(*(local_value(distribution, x, index) for x in scalars))


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
    call of a function costs more per nested argument (with one tuple per variable, a
    32-variable call took 2.4 ms eagerly against 1.6 ms). Each update waits for the
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
    update (``aggregation.all_reduce_or_defer``): added here in replica order, inside the
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
    """Apply every update, grouped by shared step scalars, in compiled chunks.

    ``cache`` (the optimizer's) keeps the compiled functions from step to step. ``device``
    (a mirror's copies, see ``mirrored_devices``) places the chunks there, each device with
    compilations of its own.
    """
    cache = {} if cache is None else cache
    with _placed(device):
        _apply_dense(updates, cache, device)


def _placed(device: Optional[str]):
    # tf.device(None) would clear the caller's device scope inside a tf.function.
    return contextlib.nullcontext() if device is None else tf.device(device)


def _apply_dense(updates: Sequence[DenseUpdate], cache: dict, device: Optional[str]) -> None:
    groups: Dict[Tuple[int, bool, bool], List[DenseUpdate]] = {}
    for update in updates:
        if native.serves(update, device):  # one pass over memory (radam_dist/native)
            native.apply_dense(update)
        else:
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
    with _placed(device):
        rest = []
        for var, slow in pairs:
            if native.serves_pull_back(var, slow, device):  # one pass (radam_dist/native)
                native.pull_back(var, slow, slow_step_size)
            else:
                rest.append((var, slow))
        alpha = tf.constant(slow_step_size, tf.float32)
        _in_chunks(
            rest, cache,
            key=lambda chunk: ("lookahead", device) + _shapes(var for var, _ in chunk),
            compile_fn=_compiled_pull_back,
            call=lambda compiled, chunk: compiled(
                [var for var, _ in chunk], [slow for _, slow in chunk], alpha, one),
        )


# -- ZeRO-1: one replica's shard (radam_dist/distribute/zero.py) ----------------------------------
def _compiled_rows_update():
    """A fresh XLA-compiled function over a shard's rows: like ``_compiled_dense_update``,
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


def apply_dense_rows(rows: Sequence[tf.Tensor], grads: Sequence[tf.Tensor],
                     ms: Sequence[tf.Variable], vs: Sequence[tf.Variable],
                     vhats: Sequence[Optional[tf.Variable]],
                     scalars: Sequence[radam_math.StepScalars],
                     cache: Optional[dict] = None, device: Optional[str] = None) -> List[tf.Tensor]:
    """ZeRO-1's local update: ``radam_math.apply_dense`` on each shard (``rows[i]``, its
    gradient rows and its m / v / vhat slot copies), in compiled chunks of ``MAX_GROUP``;
    returns the new rows, in the order given. Bit for bit the per-variable path's (the
    scalars are computed outside, as in ``apply_dense``)."""
    cache = {} if cache is None else cache
    out: List[Optional[tf.Tensor]] = [None] * len(rows)
    groups: Dict[tuple, List[int]] = {}
    for i, s in enumerate(scalars):
        groups.setdefault((id(s.lr), s.has_weight_decay, vhats[i] is not None), []).append(i)
    with _placed(device):
        for (_, has_decay, has_vhat), members in groups.items():
            members = sorted(members, key=lambda i: (rows[i].dtype.name, tuple(rows[i].shape)))
            for start in range(0, len(members), MAX_GROUP):
                chunk = members[start : start + MAX_GROUP]
                key = ("radam-rows", device, has_decay, has_vhat) + tuple(
                    (rows[i].dtype.name, tuple(rows[i].shape), grads[i].dtype.name)
                    for i in chunk)
                compiled = cache.get(key)
                if compiled is None:
                    compiled = cache[key] = _compiled_rows_update()
                new = compiled([rows[i] for i in chunk], [ms[i] for i in chunk],
                               [vs[i] for i in chunk],
                               [vhats[i] for i in chunk] if has_vhat else [],
                               [grads[i] for i in chunk], scalars[chunk[0]])
                for i, value in zip(chunk, new):
                    out[i] = value
    return out
