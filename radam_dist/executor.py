"""The one executor of a step: every RAdam update and every Lookahead pull-back runs here, by
the kernel the optimizer's plan (``radam_dist/step/plan.py``) picks.

Why: the replicated step (no strategy, or each device's copies of mirrored variables), ZeRO's
shards (a replica's rows, on one device or under MWMS) and Lookahead's synchronisation all
end in the same three kernels. With the choice in one place a kernel reaches every layout:
ZeRO's chunks get the one-pass kernel like whole variables, and a new kernel is added once.

The drivers above this module (the state layouts) decide *what* is updated where: which
device's copy, which replica's rows, which gradient. This module decides *how*:

* ``update_dense``: dense updates of variables or of ``radam_math.Rows`` (a ZeRO replica's
  rows, whose ``value`` is replaced), each by ``native`` or in ``xla-chunks`` (fused.py);
* ``update_one``: the per-variable path (one TF op at a time; sparse gradients always);
* ``pull_back`` / ``pull_back_one`` / ``pull_back_rows``: Lookahead's synchronisation of
  (fast, slow) pairs, batched, one at a time, or of a ZeRO replica's rows;
* ``when``: run updates on the steps where a predicate holds, without XLA copying them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from radam_dist import fused, native, radam_math

# The kernels a step plan (step/plan.py) names; plan.kernel / plan.pull_back_kernel return one.
NATIVE = "native"  # the one-pass CPU kernel (radam_dist/native)
XLA_CHUNKS = "xla-chunks"  # compiled chunks (fused.py)
INLINE = "inline"  # a caller's own jit_compile compiles the step: radam_math's ops go in as is
PER_VARIABLE = "per-variable"  # one TF op at a time (update_one, pull_back_one)


def update_dense(updates: Sequence[fused.DenseUpdate], *, plan, cache: dict,
                 device: Optional[str] = None) -> None:
    """Apply every dense update (``fused.DenseUpdate``) on ``device`` (None: where the
    variables are), each by the kernel ``plan.kernel`` picks: the one-pass kernel, else
    compiled chunks (which a caller's jit_compile inlines). Rows targets get their new value.
    ``cache`` is the optimizer's: compiled chunks are kept from step to step."""
    with fused.placed(device):
        chunked = []
        for update in updates:
            if plan.kernel(update, device) == NATIVE:
                native.apply_dense(update)
            else:
                chunked.append(update)
        if chunked:
            fused.apply_dense(chunked, cache=cache, device=device)


def update_one(var, grad, m, v, vhat, scalars: radam_math.StepScalars) -> None:
    """The per-variable path: ``radam_math`` one TF op at a time (a sparse gradient always
    comes here: only its rows of m and v move)."""
    if isinstance(grad, tf.IndexedSlices):
        radam_math.apply_sparse(var, grad.values, grad.indices, m, v, vhat, scalars)
    else:
        radam_math.apply_dense(var, grad, m, v, vhat, scalars)


def update_rows(updates: Sequence[fused.DenseUpdate], *, plan, cache: dict,
                device: Optional[str] = None) -> List[tf.Tensor]:
    """A ZeRO replica's dense updates of its rows (``update.var`` a ``radam_math.Rows``):
    by ``update_dense`` where the plan compiles rows, else per variable; returns the new rows
    in the order given."""
    if plan.compiles_rows():
        update_dense(updates, plan=plan, cache=cache, device=device)
    else:
        with fused.placed(device):
            for u in updates:
                update_one(u.var, u.grad, u.m, u.v, u.vhat, u.scalars)
    return [tf.convert_to_tensor(u.var) for u in updates]


def pull_back(pairs: Sequence[Tuple], slow_step_size: float, one, *, plan, cache: dict,
              device: Optional[str] = None) -> None:
    """Lookahead's synchronisation (``radam_math.lookahead_pull_back``) of every (fast, slow)
    pair: by the one-pass kernel, in compiled chunks, or inline in a caller's XLA."""
    with fused.placed(device):
        rest = []
        for var, slow in pairs:
            kernel = plan.pull_back_kernel(var, slow, device)
            if kernel == NATIVE:
                native.pull_back(var, slow, slow_step_size)
            elif kernel == INLINE:  # the caller compiles the whole step
                pull_back_one(var, slow, slow_step_size, one)
            else:
                rest.append((var, slow))
        if rest:
            fused.pull_back(rest, slow_step_size, one, cache, device=device)


def pull_back_one(var, slow, slow_step_size: float, one=None) -> None:
    """The per-variable pull-back (one TF op at a time): a variable whose copies are not
    where the strategy's devices are, updated through ``extended.update``."""
    radam_math.lookahead_pull_back(var, slow, slow_step_size, one)


def pull_back_rows(pairs: Sequence[Tuple], slow_step_size: float) -> List[tf.Tensor]:
    """Lookahead's synchronisation of a ZeRO replica's rows (``radam_math.Rows``) toward
    its slow rows (a variable, updated in place); returns the new rows. One TF op at a time:
    it runs only on sync steps, inside one branch for all variables."""
    out = []
    for rows, slow in pairs:
        radam_math.lookahead_pull_back(rows, slow, slow_step_size)
        out.append(rows.value)
    return out


def when(pred, update_fn) -> None:
    """Run ``update_fn`` (which only assigns variables) on the steps where ``pred`` holds.

    Outside XLA this is ``tf.cond``. Under XLA a conditional threads every variable it may
    assign through both branches and copies them on every step, taken or not; a while loop
    that runs once or not at all updates them in place (docs/BENCHMARKS.md, "XLA writes").
    """
    if not radam_math.in_xla_context():

        def run():
            update_fn()
            return tf.constant(True)

        tf.cond(pred, run, lambda: tf.constant(False))
        return

    def run_once(count):
        update_fn()
        return count + 1

    runs = tf.cast(pred, tf.int32)
    tf.while_loop(lambda count: count < runs, run_once, [tf.constant(0)])


def local_value(distribution, value, index: int):
    """Device ``index``'s component of ``value`` (a PerReplica / Mirrored value from
    merge_call), or ``value`` itself where it is the same on every device."""
    if isinstance(value, tf.distribute.DistributedValues):
        return distribution.experimental_local_results(value)[index]
    return value


def local_scalars(distribution, scalars: radam_math.StepScalars, index: int):
    """The step scalars of device ``index`` (each field its component there)."""
    return radam_math.StepScalars(*(local_value(distribution, x, index) for x in scalars))

