"""One plan for an optimizer's step: where the state lives, how gradients are exchanged, which
kernel updates each variable group, and why.

Why: the choice used to be spread over a dozen predicates in six modules, with environment
switches read while tracing. Here it is made in one place: the switches are read once, when
the optimizer (and with it its plan) is made; the state layout is chosen then too; the
exchange and the kernels follow from the plan's facts and the context a step is traced in.
``optimizer.step_plan()`` answers "which path does my step take, and why", and each build
logs it as one INFO line.

Exchanges (how a step's gradients reach the update):

* ``none``: one replica (or no strategy), or the caller summed them (``experimental_aggregate_
  gradients=False``);
* ``all-reduce``: Keras' cross-replica sum, in one pack (float32);
* ``all-reduce (float16)``: the same with dense float32 gradients sent as float16
  (``all_reduce_dtype``);
* ``all-reduce, large apart``: MWMS, each large dense gradient in a collective of its own;
* ``in-graph sum``: single-worker MirroredStrategy, the dense sum deferred to the update and
  added by every device in replica order;
* ZeRO-1 (``shard_optimizer_state``): ``local-reduce-scatter``, ``all-to-all`` or
  ``all-reduce+slice`` (distribute/zero.py says why each).

Kernels (what updates a dense float group): ``native`` (the one-pass CPU kernel,
radam_dist/native), ``xla-chunks`` (compiled chunks, radam_dist/fused.py), ``inline`` (a
caller's own jit_compile compiles the step; radam_math's ops go in as they are) and
``per-variable`` (one TF op at a time, as tfa ran). Sparse gradients always take
``per-variable`` (radam_math.apply_sparse).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from radam_dist import fused, native, radam_math
from radam_dist.executor import INLINE, NATIVE, PER_VARIABLE, XLA_CHUNKS
from radam_dist._env import switched_on
from radam_dist.distribute import gradient_sums, layouts, zero
from radam_dist.distribute.zero import ALL_REDUCE_SLICE, ALL_TO_ALL, LOCAL_REDUCE_SCATTER

log = logging.getLogger("radam_dist.step")

# -- the environment switches (docs/DISTRIBUTE.md, fused.py) ---------------------------------------
FUSED_SWITCH = fused.ENV_SWITCH  # 0: every variable per-variable, one TF op at a time
NATIVE_SWITCH = native.ENV_SWITCH  # 0: no one-pass kernel, XLA chunks instead
INGRAPH_SWITCH = gradient_sums.INGRAPH_SWITCH  # 0: Keras' all-reduce under a local MirroredStrategy
SPLIT_SWITCH = gradient_sums.SPLIT_SWITCH  # 0: Keras' single pack under MWMS
ZERO_EXCHANGE_ENV = zero.EXCHANGE_ENV  # all-reduce: ZeRO takes all-reduce+slice

# -- names of the choices -------------------------------------------------------------------------
# ZeRO-1's exchanges (LOCAL_REDUCE_SCATTER, ALL_TO_ALL, ALL_REDUCE_SLICE) are named in zero.py.
NO_EXCHANGE = "none"
ALL_REDUCE = "all-reduce"
COMPRESSED_ALL_REDUCE = "all-reduce (float16)"
SPLIT_ALL_REDUCE = "all-reduce, large apart"
IN_GRAPH_SUM = "in-graph sum"

# The kernels (NATIVE, XLA_CHUNKS, INLINE, PER_VARIABLE) are named in executor.py, which runs them.


@dataclasses.dataclass(frozen=True)
class Switches:
    """The environment's switches, read once (``from_environment``) when a plan is made."""

    fused: bool = True
    native: bool = True
    in_graph_sum: bool = True
    split_all_reduce: bool = True
    zero_all_reduce: bool = False  # RADAM_DIST_ZERO_EXCHANGE=all-reduce

    @classmethod
    def from_environment(cls) -> "Switches":
        exchange = os.environ.get(ZERO_EXCHANGE_ENV, "").strip().lower()
        return cls(fused=switched_on(FUSED_SWITCH), native=switched_on(NATIVE_SWITCH),
                   in_graph_sum=switched_on(INGRAPH_SWITCH),
                   split_all_reduce=switched_on(SPLIT_SWITCH),
                   zero_all_reduce=exchange in ("all-reduce", "allreduce"))


@dataclasses.dataclass(frozen=True)
class Group:
    """One variable group of a plan and the kernel that updates it."""

    what: str  # "dense float32", "sparse", ...
    count: int
    kernel: str
    why: str


class StepPlan:
    """The step of one optimizer under its strategy (see the module docstring).

    Made once, in the optimizer's ``__init__``; its decisions are methods so that the facts
    only a traced step knows (replica or cross-replica context, a caller's XLA) come in
    where they are needed. The optimizer's configuration (clipping, ``all_reduce_dtype``) is
    read live, as Keras reads it.
    """

    def __init__(self, optimizer, shard_state: bool, role: str = "radam",
                 switches: Optional[Switches] = None):
        self.switches = switches or Switches.from_environment()
        self.role = role  # "radam": the update; "lookahead": the slow weights' pull-back
        self._optimizer = optimizer
        self.strategy = optimizer.distribution_strategy
        self.layout = layouts.for_strategy(self.strategy, shard_state)
        self.last_exchange: Optional[Tuple[str, str]] = None  # of the last traced step
        self._dtypes: Dict[str, int] = {}
        self._sparse: Dict[int, str] = {}  # id(variable) -> dtype, for traced sparse gradients
        self._logged = False

    # -- the exchange -----------------------------------------------------------------------
    def sums_in_graph(self) -> bool:
        """Can this step defer its dense gradients' sum to the update (``in-graph sum``)?

        Only a single-worker MirroredStrategy with merge_call, more than one replica, the
        float32 all-reduce and no clipping (which needs the summed gradient before the
        update)."""
        return self._sums_in_graph_under(_replicated_strategy_extended())

    def sums_large_gradients_apart(self) -> bool:
        """Does this step all-reduce its large dense gradients one by one (MWMS, float32)?"""
        return self._sums_apart_under(_replicated_strategy_extended())

    def _sums_in_graph_under(self, extended) -> bool:
        """``sums_in_graph`` where the step's strategy is ``extended`` (None: no strategy or
        one replica)."""
        from tensorflow.python.distribute import mirrored_strategy  # pylint: disable=import-outside-toplevel

        optimizer = self._optimizer
        if not self.switches.in_graph_sum or getattr(optimizer, "all_reduce_dtype", None) is not None:
            return False
        if any(getattr(optimizer, name, None) for name in ("clipnorm", "global_clipnorm", "clipvalue")):
            return False
        return (type(extended) is mirrored_strategy.MirroredExtended  # pylint: disable=unidiomatic-typecheck
                and not getattr(extended, "_is_multi_worker_training", False)
                and extended._use_merge_call())  # pylint: disable=protected-access

    def _sums_apart_under(self, extended) -> bool:
        # pylint: disable-next=import-outside-toplevel
        from tensorflow.python.distribute import collective_all_reduce_strategy as cars

        if not self.switches.split_all_reduce or getattr(
                self._optimizer, "all_reduce_dtype", None) is not None:
            return False
        return isinstance(extended, cars.CollectiveAllReduceExtended)

    def exchange(self, traced: bool = True) -> Tuple[str, str]:
        """(exchange, why) of a step traced now (``traced=False``: of a step in
        ``strategy.run``, as ``describe`` tells it before one ran)."""
        optimizer = self._optimizer
        if self.layout.shards_state:
            return self.zero_exchange()
        if self.strategy.num_replicas_in_sync < 2:
            return NO_EXCHANGE, "one replica"
        if not getattr(optimizer, "_aggregate_gradients", True):
            return NO_EXCHANGE, "the caller summed the gradients"
        if getattr(optimizer, "all_reduce_dtype", None) is not None:
            return COMPRESSED_ALL_REDUCE, "all_reduce_dtype='float16'"
        # traced: the context the step is traced in; else the strategy's, as strategy.run has it
        extended = _replicated_strategy_extended() if traced else self.strategy.extended
        if self._sums_in_graph_under(extended):
            return IN_GRAPH_SUM, ("single-worker MirroredStrategy: every device adds the "
                                  f"replicas' gradients itself ({INGRAPH_SWITCH}=0: Keras')")
        if self._sums_apart_under(extended):
            return SPLIT_ALL_REDUCE, ("MWMS: each gradient of 1 MiB or more in a collective of "
                                      f"its own ({SPLIT_SWITCH}=0: one pack)")
        return ALL_REDUCE, "Keras' cross-replica sum"

    def zero_exchange(self) -> Tuple[str, str]:
        """(exchange, why) of a ZeRO-1 step: how it moves gradients to the shards and rows back.

        TensorFlow 2.21 implements ``CollectiveReduceScatterV2`` only with NCCL: on CPU the
        collective executor has no reduce-scatter ("CollectiveRegistry::Lookup did not find
        collective implementation undef", under MirroredStrategy and MWMS alike, whatever the
        communication hint), and the failed collective aborts every later one in the process.
        So:

        * single-worker MirroredStrategy (every replica a device of this process): the exchange
          is done in the step's own graph, without collective ops: replica r's shard is the sum
          of every replica's rows r (each replica sends (N-1)/N of its gradients, a
          reduce-scatter's bytes), and each replica's new rows are copied to the others (an
          all-gather);
        * MultiWorkerMirroredStrategy: TensorFlow's CPU collectives do have an all-to-all
          (``CollectiveAllToAllV2``), so each replica sends replica r' the rows r' of its dense
          gradients and sums the N blocks it receives in replica order (``all-to-all``): a
          reduce-scatter's bytes, (N-1)/N of the gradients; sparse gradients go by Keras'
          all-reduce of IndexedSlices as in the replicated step;
        * where the step needs the whole summed gradient (clipping by norm, the float16
          all-reduce), in a replica context without merge_call under MirroredStrategy, or
          under ``RADAM_DIST_ZERO_EXCHANGE=all-reduce``: Keras' all-reduce, then each replica
          slices its rows, then an all-gather (``all-reduce+slice``).
        """
        if self.switches.zero_all_reduce:
            return ALL_REDUCE_SLICE, f"{ZERO_EXCHANGE_ENV}=all-reduce"
        optimizer, strategy = self._optimizer, self.strategy
        extended = strategy.extended
        clipping = [name for name in ("clipnorm", "global_clipnorm")
                    if (getattr(optimizer, name, None) or 0) > 0]
        # Why the step needs the whole summed gradient, if it does.
        needs_whole = ("all_reduce_dtype (compressed all-reduce) is set"
                       if getattr(optimizer, "all_reduce_dtype", None) is not None else
                       f"{clipping[0]} needs the whole summed gradient" if clipping else None)
        if extended._in_multi_worker_mode():  # pylint: disable=protected-access
            if needs_whole:
                return ALL_REDUCE_SLICE, needs_whole
            if not getattr(optimizer, "_aggregate_gradients", True):
                return ALL_REDUCE_SLICE, "gradients already summed: each replica slices its rows"
            if zero.collective_launcher(strategy, 0) is None:
                return ALL_REDUCE_SLICE, (f"{type(extended._cross_device_ops).__name__} has no "  # pylint: disable=protected-access
                                          "collective launchers for an all-to-all")
            return ALL_TO_ALL, ("multi-worker: CollectiveAllToAllV2 of the dense gradients' row "
                                "blocks (CollectiveReduceScatterV2 is NCCL only)")
        if not isinstance(strategy, tf.distribute.MirroredStrategy):
            return ALL_REDUCE_SLICE, f"{type(strategy).__name__}"
        use_merge_call = getattr(extended, "_use_merge_call", lambda: True)
        if not use_merge_call():
            return ALL_REDUCE_SLICE, "replica context without merge_call (XLA on GPUs)"
        if needs_whole:
            return ALL_REDUCE_SLICE, needs_whole
        return LOCAL_REDUCE_SCATTER, "single-worker MirroredStrategy: in-graph reduce-scatter"

    def note_exchange(self, exchange: str, why: str) -> None:
        """Record (and log once per kind) the exchange a traced step took."""
        if self.last_exchange != (exchange, why) and exchange != NO_EXCHANGE:
            log.info("%s: gradients by %s (%s)", getattr(self._optimizer, "name", "optimizer"),
                     exchange, why)
        self.last_exchange = (exchange, why)

    # -- the kernels --------------------------------------------------------------------------
    def compiles_without_strategy(self, distribution) -> bool:
        """No tf.distribute strategy: dense updates go to ``update_dense`` as one batch (one
        branch, compiled chunks or the kernel) instead of one ``extended.update`` each."""
        return self.switches.fused and not tf.distribute.has_strategy() and (
            distribution is None or distribution is tf.distribute.get_strategy())

    def mirrored_devices(self, distribution) -> Optional[Tuple[str, ...]]:
        """The local devices whose copies the update writes itself, or None (per-variable
        ``extended.update``).

        Only MirroredStrategy and MWMS in cross-replica context (inside the optimizer's
        merge_call), outside a caller's XLA, qualify: there every variable is a mirror with
        one copy per local device. ParameterServerStrategy's variables live on the servers.
        """
        from tensorflow.python.distribute import mirrored_strategy  # pylint: disable=import-outside-toplevel

        if (not self.switches.fused or distribution is None
                or not tf.distribute.in_cross_replica_context()
                or not isinstance(distribution.extended, mirrored_strategy.MirroredExtended)):
            return None
        return tuple(distribution.extended.worker_devices)

    def compiles_rows(self) -> bool:
        """ZeRO-1: do a replica's dense rows go to ``update_dense`` (else per-variable)?"""
        return self.switches.fused

    def kernel(self, update, device: Optional[str]) -> str:
        """The kernel for one dense update (``fused.DenseUpdate``) placed on ``device``."""
        if native.serves(update, device, switched_on=self.switches.native):
            return NATIVE
        return INLINE if radam_math.in_xla_context() else XLA_CHUNKS

    def pull_back_kernel(self, var, slow, device: Optional[str]) -> str:
        if native.serves_pull_back(var, slow, device, switched_on=self.switches.native):
            return NATIVE
        return INLINE if radam_math.in_xla_context() else XLA_CHUNKS

    # -- what a user asks -----------------------------------------------------------------------
    def note_sparse(self, variables: Sequence) -> None:
        """Record the variables a traced step gave sparse gradients (IndexedSlices)."""
        for var in variables:
            self._sparse[id(var)] = tf.as_dtype(var.dtype).name

    def note_variables(self, variables: Sequence) -> None:
        """Record the variable groups a build saw, for ``describe``."""
        self._dtypes = {}
        for var in variables:
            name = tf.as_dtype(var.dtype).name
            self._dtypes[name] = self._dtypes.get(name, 0) + 1

    def groups(self) -> List[Group]:
        """The variable groups with their kernels, as the next step would take them."""
        if self.role == "lookahead":
            return [Group(f"slow weights {dtype}", count, *self._dense_kernel(dtype))
                    for dtype, count in sorted(self._dtypes.items())]
        out = []
        sparse = len(self._sparse)
        for dtype, count in sorted(self._dtypes.items()):
            count -= sum(1 for d in self._sparse.values() if d == dtype)
            if count > 0:
                out.append(Group(f"dense {dtype}", count, *self._dense_kernel(dtype)))
        if sparse:
            out.append(Group("sparse gradients", sparse, PER_VARIABLE,
                             "radam_math.apply_sparse, the touched rows of m and v"))
        return out

    def _dense_kernel(self, dtype: str) -> Tuple[str, str]:
        if not self.switches.fused:
            return PER_VARIABLE, f"{FUSED_SWITCH}=0"
        if isinstance(self.strategy, tf.distribute.experimental.ParameterServerStrategy):
            return PER_VARIABLE, "ParameterServerStrategy: each variable on its server"
        if not self.switches.native:
            return XLA_CHUNKS, f"{NATIVE_SWITCH}=0"
        if dtype not in native.SUPPORTED_DTYPES:
            return XLA_CHUNKS, f"the kernel serves {' and '.join(native.SUPPORTED_DTYPES)}"
        if native.unavailable_reason():
            return XLA_CHUNKS, f"kernel not available: {native.unavailable_reason()}"
        return NATIVE, "the one-pass CPU kernel; on a GPU or in a caller's jit_compile: XLA chunks"

    def describe(self) -> str:
        """Several lines: the state layout, the exchange and each group's kernel, with why."""
        optimizer = self._optimizer
        name = f"{type(optimizer).__name__} {getattr(optimizer, 'name', '')!r}"
        replicas = self.strategy.num_replicas_in_sync
        where = (f"under {type(self.strategy).__name__} ({replicas} replica"
                 f"{'' if replicas == 1 else 's'})") if tf.distribute.has_strategy() or (
            self.strategy is not tf.distribute.get_strategy()) else "without a strategy"
        lines = [f"{name} {where}",
                 f"  state: {self.layout.kind}"]
        inner = getattr(getattr(optimizer, "inner_optimizer", None), "step_plan", None)
        if self.role == "lookahead":
            if self.layout.shards_state and self.last_exchange is not None:
                lines.append(f"  slow weights' rows: {self.last_exchange[0]}")
            lines += [f"  {g.what} ({g.count}): {g.kernel} ({g.why})" for g in self.groups()]
            if inner is not None:
                lines += ["  inner: " + line if i == 0 else "  " + line
                          for i, line in enumerate(inner().describe().splitlines())]
            return "\n".join(lines)
        if self.last_exchange is not None:
            exchange, why = self.last_exchange
            lines.append(f"  gradients: {exchange} ({why}; as last traced)")
        else:
            exchange, why = self.exchange(traced=False)
            lines.append(f"  gradients: {exchange} ({why})")
        for group in self.groups():
            lines.append(f"  {group.what} ({group.count}): {group.kernel} ({group.why})")
        return "\n".join(lines)

    def log_once(self) -> None:
        """One INFO line per build: the plan, folded."""
        if not self._logged:
            self._logged = True
            log.info("step plan: %s", "; ".join(line.strip() for line in self.describe().splitlines()))

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"<StepPlan\n{self.describe()}>"


def _replicated_strategy_extended():
    """The strategy's ``extended`` in a replica context with more than one replica, else
    None: where a step's gradients still are each replica's own."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync < 2:
        return None
    return tf.distribute.get_strategy().extended
