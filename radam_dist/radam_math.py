"""The one home of the RAdam math: warmup, rectification, and the per-variable update.

Everything that applies RAdam (the Keras optimizer, the replica-sharded path, the gRPC
parameter server) calls these functions, so the numbers cannot drift apart. The one copy is
``radam_dist/native/radam_kernel.cc``: ``apply_dense`` and ``lookahead_pull_back`` written out
in C++, one loop each, for CPU devices; ``tests/test_native_kernel.py`` holds it to this module
bit for bit.

The split follows optax's composition of small transforms: the per-step scalars
(``step_scalars``) depend only on the step count and the hyperparameters and are computed
once per step, not once per variable; ``apply_dense`` / ``apply_sparse`` then do the
elementwise work on one variable and its slots.

The arithmetic follows tensorflow-addons 0.23 operation by operation (same order of
multiplications, epsilon outside the square root, coefficients as reciprocals) so float32
results agree to round-off. Where tfa is wrong we deviate on purpose:

* the coefficients are computed in float32 (float64 for float64 variables), never in a
  16-bit variable dtype, where beta_2 rounds to 1.0 and the step count saturates;
* the rectification term is never NaN: where tfa takes the square root of a negative number
  (2 < sma_t < 4, reachable with sma_threshold < 4) we take the un-rectified momentum step,
  the RAdam paper's rule for when the variance of the adaptive rate is intractable.

Compiled with XLA (``jit_compile``, or the fused path in ``radam_dist.fused``), the code
generator would contract ``a * b + c`` into one fused multiply-add, rounding once where TF's
kernels (and tfa) round twice. Inside an XLA context every product that feeds a sum goes
through ``_rounded``, which multiplies it by ``StepScalars.one``: exactly 1.0, but computed
from the step so the compiler cannot prove it. ``fma(p, one, c)`` then equals ``p + c`` with
``p`` already rounded, so given the same step scalars the update is bit-for-bit the plain
path's. The fused path computes the scalars with TF's kernels, outside the compiled update,
and is exact.

Under a caller's own ``jit_compile`` exactness is out of reach anyway: XLA computes the
scalars too and reassociates expressions of constants (``(3 - x) - 2`` into ``1 - x``), and
moves constants past ``one``. There ``step_scalars`` leaves ``one`` out, XLA contracts
freely, and the update agrees with the plain path to round-off; the five multiplications by
``one`` per element cost 4% of a step that is otherwise as fast as Keras' Adam.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf


class RAdamHyperparams(NamedTuple):
    """The constant hyperparameters of RAdam (learning rate and weight decay vary per step)."""

    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    amsgrad: bool = False
    sma_threshold: float = 5.0
    total_steps: float = 0.0
    warmup_proportion: float = 0.1
    min_lr: float = 0.0


class StepScalars(NamedTuple):
    """Scalars shared by every variable in one step (tensors of the compute dtype)."""

    lr: tf.Tensor  # warmup-adjusted learning rate
    weight_decay: tf.Tensor
    beta_1: tf.Tensor
    one_minus_beta_1: tf.Tensor
    beta_2: tf.Tensor
    one_minus_beta_2: tf.Tensor
    m_correction: tf.Tensor  # 1 / (1 - beta_1^t)
    v_correction: tf.Tensor  # 1 / (1 - beta_2^t)
    r_t: tf.Tensor  # rectification term, 0 where it does not apply
    rectified: tf.Tensor  # bool: take the adaptive (rectified) step
    epsilon: tf.Tensor
    has_weight_decay: bool  # Python bool: skip the decay ops entirely when 0
    # Exactly 1.0 (m_correction / m_correction), opaque to XLA: see ``_rounded``. None when
    # the scalars were computed inside the caller's XLA computation.
    one: Optional[tf.Tensor] = None


def check_hyperparameters(beta_1: float, beta_2: float, total_steps, warmup_proportion) -> None:
    """ValueError naming the first value outside the range where the RAdam math is defined.

    Both RectifiedAdam optimizers (Keras 3 and tf_keras) check their constructor arguments
    here, so a bad value is refused with the same message by either.
    """
    for name, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0.0, 1.0), got {beta}")
    if int(total_steps) != total_steps or total_steps < 0:
        raise ValueError(f"total_steps must be a non-negative integer, got {total_steps!r}")
    if not 0.0 <= warmup_proportion <= 1.0:
        raise ValueError(f"warmup_proportion must be in [0, 1], got {warmup_proportion}")


def check_rate(name: str, value, positive: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is finite and >= 0 (> 0 if ``positive``):
    the parameter server's rule for learning rates, epsilon, min_lr and weight decay. A
    schedule, a callable or a tensor is left alone (its values come later)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")


def check_lookahead_hyperparameters(sync_period, slow_step_size) -> None:
    """ValueError naming the first of Lookahead's arguments that is out of range."""
    if (isinstance(sync_period, bool) or not isinstance(sync_period, (int, float, np.number))
            or not math.isfinite(sync_period) or int(sync_period) != sync_period
            or sync_period < 1):
        raise ValueError(f"sync_period must be a positive integer, got {sync_period!r}")
    if (isinstance(slow_step_size, bool)
            or not isinstance(slow_step_size, (int, float, np.number))
            or not 0.0 <= slow_step_size <= 1.0):
        raise ValueError(f"slow_step_size must be a number in [0, 1], got {slow_step_size!r}")


def compute_dtype(var_dtype: tf.DType) -> tf.DType:
    """float64 for float64 variables, float32 for everything else (16-bit included)."""
    return tf.float64 if var_dtype == tf.float64 else tf.float32


def hyperparameter(value, dtype: tf.DType) -> tf.Tensor:
    """A hyperparameter as tf.keras held it: a float32 value, cast to the compute dtype.

    (tfa's float64 runs therefore see float32-rounded betas; only epsilon is exact.)
    """
    return tf.cast(tf.constant(value, tf.float32), dtype)


def warmup_learning_rate(lr, step, total_steps, warmup_proportion, min_lr):
    """tfa's warmup: linear rise to ``lr`` over total_steps * warmup_proportion steps (not
    rounded), then linear decay to ``min_lr`` over max(total - warmup, 1) steps, then min_lr.

    ``step`` is the 1-based step of the update being applied.
    """
    dtype = lr.dtype
    total_steps = hyperparameter(total_steps, dtype)
    warmup_steps = total_steps * hyperparameter(warmup_proportion, dtype)
    min_lr = hyperparameter(min_lr, dtype)
    decay_steps = tf.maximum(total_steps - warmup_steps, 1)
    decay_rate = (min_lr - lr) / decay_steps
    return tf.where(
        step <= warmup_steps,
        lr * (step / warmup_steps),
        lr + decay_rate * tf.minimum(step - warmup_steps, decay_steps),
    )


def rectification(step, beta_2, sma_threshold):
    """The RAdam rectification for 1-based ``step``: returns (sma_t, r_t, rectified).

    sma_inf = 2 / (1 - beta_2) - 1;  sma_t = sma_inf - 2 t beta_2^t / (1 - beta_2^t).
    r_t is the variance-rectification factor; ``rectified`` says whether the adaptive step
    applies (sma_t >= sma_threshold and r_t is real).
    """
    beta_2_power = tf.pow(beta_2, step)
    sma_inf = 2.0 / (1.0 - beta_2) - 1.0
    sma_t = sma_inf - 2.0 * step * beta_2_power * (1.0 / (1.0 - beta_2_power))
    r_squared = (sma_t - 4.0) / (sma_inf - 4.0) * (sma_t - 2.0) / (sma_inf - 2.0) * sma_inf / sma_t
    real = r_squared >= 0.0
    r_t = tf.sqrt(tf.where(real, r_squared, tf.zeros_like(r_squared)))
    rectified = tf.logical_and(sma_t >= sma_threshold, real)
    return sma_t, r_t, rectified


def step_scalars(
    step,
    lr,
    weight_decay,
    hp: RAdamHyperparams,
    dtype: tf.DType = tf.float32,
    has_weight_decay: bool = True,
) -> StepScalars:
    """Everything one RAdam step needs besides the tensors, computed once per step.

    ``step`` is 1-based (iterations + 1); ``lr`` and ``weight_decay`` are this step's values
    after any schedule or legacy ``decay`` has been applied.
    """
    step = tf.cast(step, dtype)
    lr = tf.cast(lr, dtype)
    beta_1 = hyperparameter(hp.beta_1, dtype)
    beta_2 = hyperparameter(hp.beta_2, dtype)
    beta_1_power = tf.pow(beta_1, step)
    beta_2_power = tf.pow(beta_2, step)
    m_correction = 1.0 / (1.0 - beta_1_power)  # finite and >= 1 for every step >= 1
    one = runtime_one(m_correction)
    _, r_t, rectified = rectification(step, beta_2, hyperparameter(hp.sma_threshold, dtype))
    if hp.total_steps > 0:
        lr = warmup_learning_rate(lr, step, hp.total_steps, hp.warmup_proportion, hp.min_lr)
    return StepScalars(
        lr=lr,
        weight_decay=tf.cast(weight_decay, dtype),
        beta_1=beta_1,
        one_minus_beta_1=1.0 - beta_1,
        beta_2=beta_2,
        one_minus_beta_2=1.0 - beta_2,
        m_correction=m_correction,
        v_correction=1.0 / (1.0 - beta_2_power),
        r_t=r_t,
        rectified=rectified,
        epsilon=tf.constant(hp.epsilon, dtype),
        has_weight_decay=has_weight_decay,
        one=one,
    )


def runtime_one(nonzero: tf.Tensor) -> Optional[tf.Tensor]:
    """Exactly 1.0, computed from a nonzero runtime value so that XLA cannot prove it: the
    ``one`` of ``_rounded``. None inside a caller's XLA computation, where exactness is out
    of reach (see the module docstring) and the multiplications by it would only cost time.
    """
    return None if in_xla_context() else nonzero / nonzero


def in_xla_context() -> bool:
    """True while tracing code that XLA will compile (``jit_compile`` or a compiled caller)."""
    from tensorflow.python.framework import ops  # pylint: disable=import-outside-toplevel
    from tensorflow.python.ops import control_flow_util  # pylint: disable=import-outside-toplevel

    return not tf.executing_eagerly() and control_flow_util.GraphOrParentsInXlaContext(
        ops.get_default_graph()
    )


def _rounded(product, one):
    """``product``, kept rounded on its own under XLA even when a sum follows it.

    TF's kernels run one op at a time; XLA's code generator contracts ``a * b + c`` into a
    fused multiply-add, which rounds once where TF (and tfa) round twice. ``(a * b) * one``
    with ``one`` a runtime 1.0 leaves nothing to contract but the exact ``* one``:
    ``fma(p, 1, c) == p + c``. Outside XLA (or with ``one=None``) this is the identity.
    """
    if one is None or not in_xla_context():
        return product
    return product * tf.cast(one, product.dtype)


def _product(a, b, s: StepScalars):
    """``a * b`` for a sum that follows: see ``_rounded``."""
    return _rounded(a * b, s.one)


def direction(m_t, v_hat_t, var, s: StepScalars):
    """The step before it is scaled by -lr: rectified Adam or plain momentum, plus decay."""
    m_corr = _product(m_t, s.m_correction, s)  # the momentum step adds decay to it
    v_corr = tf.sqrt(v_hat_t * s.v_correction)
    update = tf.where(s.rectified, s.r_t * m_corr / (v_corr + s.epsilon), m_corr)
    if s.has_weight_decay:
        update += _product(s.weight_decay, var, s)
    return update


class Rows:
    """A transient stand-in for a variable, so that the updates below run on a tensor that is
    not stored anywhere (a ZeRO replica's chunk of rows, a compiled chunk's slice): they read it, assign
    it and scatter-add to it like a variable; ``value`` holds the current tensor."""

    def __init__(self, value):
        self.value = value

    @property
    def dtype(self):
        return self.value.dtype

    @property
    def shape(self):
        return self.value.shape

    def assign(self, value):
        self.value = value

    def scatter_add(self, slices):
        self.value = tf.tensor_scatter_nd_add(
            self.value, tf.expand_dims(slices.indices, -1), slices.values
        )


tf.register_tensor_conversion_function(
    Rows, lambda rows, dtype=None, name=None, as_ref=False: rows.value
)


def _read(variable, dtype):
    value = tf.convert_to_tensor(variable)
    return value if value.dtype == dtype else tf.cast(value, dtype)


def _write(variable, value):
    if value.dtype != variable.dtype:
        value = tf.cast(value, variable.dtype)
    variable.assign(value)


def apply_dense(var, grad, m, v, vhat: Optional[tf.Variable], s: StepScalars) -> None:
    """One RAdam step on a variable with a dense gradient (updates var, m, v, vhat in place)."""
    dtype = s.lr.dtype
    grad = _read(grad, dtype)
    m_t = _product(s.beta_1, _read(m, dtype), s) + _product(s.one_minus_beta_1, grad, s)
    v_t = _product(s.beta_2, _read(v, dtype), s) + _product(s.one_minus_beta_2, tf.square(grad), s)
    _write(m, m_t)
    _write(v, v_t)
    if vhat is not None:
        v_t = tf.maximum(_read(vhat, dtype), v_t)
        _write(vhat, v_t)
    var_value = _read(var, dtype)
    _write(var, var_value - _product(s.lr, direction(m_t, v_t, var_value, s), s))


def sum_in_replica_order(parts):
    """``parts[0] + parts[1] + ...``, left to right: the cross-replica sum the in-graph paths
    compute (the fused chunks, ZeRO's local reduce-scatter, the per-device sums). Every
    device adding in the same order keeps every copy's bits equal; for two replicas they are
    the ring all-reduce's bits too (a + b == b + a)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def deduplicate(values, indices):
    """Sum the rows of an IndexedSlices that share an index (as tf.keras optimizers do)."""
    unique, positions = tf.unique(indices)
    summed = tf.math.unsorted_segment_sum(values, positions, tf.shape(unique)[0])
    return summed, unique


def apply_sparse(var, values, indices, m, v, vhat: Optional[tf.Variable], s: StepScalars) -> None:
    """One RAdam step with a sparse gradient (rows ``indices`` of ``var``).

    As in tfa, m and v decay on every row and the gradient is added on the touched rows;
    only the touched rows of ``var`` move. Duplicate indices are summed first.

    Only ``var`` is accessed row-wise (``sparse_read``, ``scatter_add``). A TF variable that
    a gather or scatter has touched is read by copy from then on (copy-on-read mode), and
    m and v are read whole every step: so their rows are added to the decayed tensor
    (``tensor_scatter_nd_add``, the same float additions) before it is assigned. A dense
    read of ``var`` would copy the table too (docs/BENCHMARKS.md, "Figures behind the
    code").
    """
    dtype = s.lr.dtype
    values, indices = deduplicate(_read(values, dtype), indices)
    m_t = _decayed_plus_rows(m, s.beta_1, indices, _product(values, s.one_minus_beta_1, s))
    v_t = _decayed_plus_rows(
        v, s.beta_2, indices, _product(values * values, s.one_minus_beta_2, s))
    if vhat is not None:
        v_t = _stored(vhat, tf.maximum(_read(vhat, dtype), _read(v_t, dtype)))
    m_rows = _read(tf.gather(m_t, indices), dtype)
    v_rows = _read(tf.gather(v_t, indices), dtype)
    if hasattr(var, "sparse_read"):  # a variable; ZeRO passes a stand-in holding a tensor
        var_rows = _read(var.sparse_read(indices), dtype)
    else:
        var_rows = tf.gather(_read(var, dtype), indices)
    _scatter_add(var, indices, _product(-s.lr, direction(m_rows, v_rows, var_rows, s), s))


def _stored(variable, value):
    """Assign ``value`` in ``variable``'s dtype; return what was stored."""
    if value.dtype != variable.dtype:
        value = tf.cast(value, variable.dtype)
    variable.assign(value)
    return value


def _decayed_plus_rows(slot, decay, indices, rows):
    """``slot = slot * decay``, then ``rows`` added at ``indices``, each step rounded in the
    slot's dtype as a variable's multiply and scatter_add would; returns the stored tensor."""
    decayed = _read(slot, rows.dtype) * decay
    if decayed.dtype != slot.dtype:
        decayed = tf.cast(decayed, slot.dtype)
    if rows.dtype != slot.dtype:
        rows = tf.cast(rows, slot.dtype)
    return _stored(slot, tf.tensor_scatter_nd_add(decayed, tf.expand_dims(indices, -1), rows))


def _scatter_add(variable, indices, rows):
    if rows.dtype != variable.dtype:
        rows = tf.cast(rows, variable.dtype)
    variable.scatter_add(tf.IndexedSlices(rows, indices))


def lookahead_pull_back(var, slow, slow_step_size, one=None) -> None:
    """Lookahead's synchronisation: slow += alpha * (fast - slow); fast = slow.

    alpha (a float, or a float32 tensor) is held as float32, as tf.keras held
    hyperparameters, and cast to the variable's dtype. ``one``, a runtime 1.0, keeps XLA from
    contracting the sum into an FMA (``_rounded``); XLA also moves a compile-time constant
    alpha past it, so for bit-exact results under XLA pass alpha as a runtime tensor too.
    """
    slow_value = tf.convert_to_tensor(slow)
    alpha = slow_step_size_as(slow_step_size, slow_value.dtype)
    step_back = slow_value + _rounded(alpha * (tf.convert_to_tensor(var) - slow_value), one)
    slow.assign(step_back)
    var.assign(step_back)


def slow_step_size_as(slow_step_size, dtype: tf.DType) -> tf.Tensor:
    """Lookahead's alpha as the pull-back uses it: held as float32 (as tf.keras held
    hyperparameters), then cast to the variable's dtype."""
    return tf.cast(tf.convert_to_tensor(slow_step_size, tf.float32), dtype)
