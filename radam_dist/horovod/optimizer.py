"""``DistributedOptimizer``: average gradients across Horovod ranks, then let any Keras 3
optimizer (RectifiedAdam, Lookahead(RectifiedAdam), Adam, ...) apply them.

Why not ``horovod.tensorflow.keras.DistributedOptimizer``: under Keras 3 it subclasses the
optimizer but never reaches Keras 3's ``apply``, so it trains without all-reducing anything
and the ranks drift apart silently. This wrapper sits in front of ``apply`` (the one entry
point that ``model.fit``, ``apply_gradients`` and ``minimize`` all reach), all-reduces the
gradients once, grouped, and hands the result to the wrapped optimizer. It touches only
gradient tensors, never Keras variables, so Keras 3's ``keras.Variable`` is no problem.

Without a tf.distribute strategy (the Horovod way: one process per device) the wrapped
optimizer's own cross-replica sum is over a single replica, so the Horovod all-reduce is the
only reduction: gradients are averaged exactly once. Lookahead's synchronisation depends
only on the step counter, so it runs identically on every rank.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Union

import keras
import tensorflow as tf

from radam_dist import radam_math
from radam_dist.horovod._hvd import hvd, require_initialized
from radam_dist.optimizers.wrapper import ForwardsToInnerOptimizer, resolve_inner_optimizer
from radam_dist.horovod.compression import check_compression, grouped_reduce

logger = logging.getLogger(__name__)

_OPS = ("average", "sum")


def _check_op(op) -> str:
    """'average' or 'sum' from a string or hvd.Average / hvd.Sum."""
    if op is None:
        return "average"
    if isinstance(op, str) and op.lower() in _OPS:
        return op.lower()
    if not isinstance(op, str):
        module = hvd()
        if op == module.Average:
            return "average"
        if op == module.Sum:
            return "sum"
    raise ValueError(
        "op must be hvd.Average or hvd.Sum ('average' / 'sum'); Adasum, Min, Max and "
        f"Product are not supported for gradients here. Got {op!r}"
    )


class DistributedOptimizer(ForwardsToInnerOptimizer, keras.optimizers.Optimizer):
    """All-reduces gradients across Horovod ranks before ``optimizer`` applies them.

    Args:
        optimizer: the Keras 3 optimizer that does the update (its state, learning rate and
            step counter are the wrapper's too).
        op: ``hvd.Average`` (default: the gradient of the global batch) or ``hvd.Sum``.
        compression: ``None``, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in
            (see ``radam_dist.horovod.compression``). Float64 gradients are never compressed.
        backward_passes_per_step: accumulate this many local gradients (their mean) before
            one all-reduce and one optimizer step; the optimizer's step counter advances
            once per all-reduce.
        sparse_as_dense: all-reduce ``tf.IndexedSlices`` (embedding gradients) as dense
            tensors. Otherwise they are all-gathered, which is cheaper when few rows change.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        op=None,
        compression: Union[None, str, type] = None,
        backward_passes_per_step: int = 1,
        sparse_as_dense: bool = False,
        name: Optional[str] = None,
        **kwargs,
    ):
        """See the class docstring; unknown keyword arguments raise TypeError."""
        optimizer = resolve_inner_optimizer(optimizer, "DistributedOptimizer")
        if isinstance(optimizer, DistributedOptimizer):
            raise ValueError(
                "this optimizer is already a DistributedOptimizer: wrapping it twice would "
                "all-reduce the gradients twice"
            )
        op_name = _check_op(op)
        compression_name = check_compression(compression)
        if (
            isinstance(backward_passes_per_step, bool)
            or int(backward_passes_per_step) != backward_passes_per_step
            or backward_passes_per_step < 1
        ):
            raise ValueError(
                "backward_passes_per_step must be a positive integer, got "
                f"{backward_passes_per_step!r}"
            )
        if kwargs:
            raise TypeError(
                f"DistributedOptimizer got unexpected arguments {sorted(kwargs)}; set "
                "clipping, loss scaling, EMA etc. on the wrapped optimizer"
            )
        super().__init__(learning_rate=0.0, name=name or f"Distributed{optimizer.name}")
        # The learning rate and the step counter are the wrapped optimizer's.
        self._untrack_variable(self._learning_rate)
        self._untrack_variable(self._iterations)
        self.inner_optimizer = optimizer
        self.op = op_name
        self.compression = compression_name
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.sparse_as_dense = bool(sparse_as_dense)
        self._accumulators: List[keras.Variable] = []
        self._pass_counter = None

    # -- what the wrapped optimizer owns --------------------------------------------------------
    @property
    def variables(self) -> list:
        """The wrapped optimizer's variables, then the gradient accumulators (if any)."""
        return list(self.inner_optimizer.variables) + self._variables[:]

    # tfa's classic API, forwarded when the wrapped optimizer has it (RectifiedAdam, Lookahead).
    @property
    def weights(self) -> list:
        return self.inner_optimizer.weights

    def get_weights(self):
        return self.inner_optimizer.get_weights()

    def set_weights(self, weights):
        return self.inner_optimizer.set_weights(weights)

    def get_slot(self, var, slot_name: str):
        return self.inner_optimizer.get_slot(var, slot_name)

    def get_slot_names(self) -> List[str]:
        return self.inner_optimizer.get_slot_names()

    # -- state ----------------------------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        if not self.inner_optimizer.built:
            with keras.name_scope(self.inner_optimizer.name, caller=self.inner_optimizer):
                self.inner_optimizer.build(var_list)
            self.inner_optimizer.built = True
        super().build(var_list)
        if self.backward_passes_per_step > 1:
            self._pass_counter = self.add_variable(
                (), initializer="zeros", dtype="int64", name="hvd_backward_passes"
            )
            self._accumulators = [
                self.add_variable_from_reference(v, name="hvd_accumulated_gradient")
                for v in var_list
            ]
        self.built = True

    # -- one step -------------------------------------------------------------------------------
    def apply_gradients(
        self,
        grads_and_vars,
        name: Optional[str] = None,
        experimental_aggregate_gradients: bool = True,
    ):
        """Keras / tf.keras signature. ``experimental_aggregate_gradients=False`` means the
        caller already reduced the gradients across ranks: they are applied as given."""
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self.iterations
        grads, variables = zip(*grads_and_vars)
        if experimental_aggregate_gradients:
            self.apply(list(grads), list(variables))
        else:
            self.inner_optimizer.apply(list(grads), list(variables))
        return self.iterations

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "apply(grads) without variables needs a built optimizer: call "
                    "optimizer.build(model.trainable_variables) first"
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"got {len(grads)} gradients for {len(trainable_variables)} variables"
            )
        if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise ValueError(
                "DistributedOptimizer runs one replica per Horovod process; inside a "
                "tf.distribute strategy with several replicas the gradients would be "
                "reduced twice. Use either Horovod or tf.distribute, not both."
            )
        if radam_math.in_xla_context():
            raise ValueError(
                "Horovod's collective ops cannot run inside XLA: compile the model with "
                "jit_compile=False"
            )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        if self.backward_passes_per_step == 1:
            reduced = self._allreduce(grads)
            self.inner_optimizer.apply(reduced, trainable_variables)
            return
        self._accumulate_then_apply(grads, trainable_variables)

    def _accumulate_then_apply(self, grads, trainable_variables):
        index = {self._var_key(v): i for i, v in enumerate(self._trainable_variables)}
        slots = [self._accumulators[index[self._var_key(v)]] for v in trainable_variables]
        for slot, grad in zip(slots, grads):
            if grad is not None:
                slot.assign_add(tf.cast(tf.convert_to_tensor(grad), slot.dtype))
        count = self._pass_counter.assign_add(1)
        passes = self.backward_passes_per_step

        def step():
            mean = [
                None if g is None else tf.convert_to_tensor(s) / tf.cast(passes, s.dtype)
                for s, g in zip(slots, grads)
            ]
            reduced = self._allreduce(mean)
            self.inner_optimizer.apply(reduced, trainable_variables)
            for slot in slots:
                slot.assign(tf.zeros_like(slot))
            return tf.constant(True)

        tf.cond(tf.equal(count % passes, 0), step, lambda: tf.constant(False))

    def _allreduce(self, grads: Sequence) -> list:
        """One grouped all-reduce of the dense gradients (and one all-gather of the sparse)."""
        if require_initialized().size() == 1:
            return list(grads)
        average = self.op == "average"
        out = list(grads)
        dense, sparse = [], []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                if self.sparse_as_dense:
                    out[i] = tf.convert_to_tensor(g)
                    dense.append(i)
                else:
                    sparse.append(i)
            else:
                dense.append(i)
        if dense:
            reduced = grouped_reduce([out[i] for i in dense], average, self.compression)
            for i, r in zip(dense, reduced):
                out[i] = r
        if sparse:
            module = hvd()
            op = module.Average if average else module.Sum
            reduced = module.grouped_allreduce([grads[i] for i in sparse], op=op)
            for i, r in zip(sparse, reduced):
                out[i] = r
        return out

    # -- config ---------------------------------------------------------------------------------
    def get_config(self) -> dict:
        return {
            "name": self.name,
            "optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "op": self.op,
            "compression": self.compression,
            "backward_passes_per_step": self.backward_passes_per_step,
            "sparse_as_dense": self.sparse_as_dense,
        }


DistributedOptimizer = keras.saving.register_keras_serializable(package="radam_dist")(
    DistributedOptimizer
)


def unwrap(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer inside a DistributedOptimizer (or ``optimizer`` itself)."""
    while isinstance(optimizer, DistributedOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer
