"""What a state layout may ask of the optimizer whose state it holds: one small protocol.

Why: the layouts (replicated, replica-sharded, on parameter servers) used to reach into the
optimizer's private attributes (Keras' slot table, variable keys, its all-reduce and its
clipping). They now use only these names, which RectifiedAdam and Lookahead implement in
``radam_dist.optimizers.classic_api.ClassicOptimizerAPI``; a layout that needs more adds a
name here first.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Protocol, Sequence, runtime_checkable


@runtime_checkable
class StateHost(Protocol):
    """An optimizer as its state layout sees it."""

    name: str

    @property
    def distribution_strategy(self) -> Any:
        """The strategy the optimizer (and its state) was made under."""

    @property
    def state_layout(self) -> Any:
        """The optimizer's layout (this protocol's caller)."""

    @property
    def sums_gradients(self) -> bool:
        """False where the caller summed the gradients across replicas already."""

    def step_plan(self) -> Any:
        """The optimizer's step plan (radam_dist/step/plan.py)."""

    def compiled_cache(self) -> dict:
        """Compiled update chunks kept from step to step."""

    def variable_index(self, variable) -> int:
        """Position of ``variable`` among the variables the optimizer was built with."""

    def variable_key(self, variable) -> Any:
        """A key every wrapper of ``variable`` shares."""

    def slot_table(self) -> Dict[str, list]:
        """Slot name -> per-variable slot variables."""

    def tracked_variables(self) -> list:
        """Keras' own list of the optimizer's variables."""

    def tracked_dependency(self, name: str) -> Any:
        """The optimizer's checkpoint dependency ``name``, or None."""

    def sum_gradients(self, grads_and_vars: Sequence) -> list:
        """Keras' cross-replica sum of the pairs."""

    def clip_summed(self, grads: Sequence) -> List:
        """Clipping of summed gradients."""

    def decays(self, variable) -> bool:
        """Whether weight decay applies to ``variable``."""

    def guard_checkpoint_children(self, guard: Callable[[str], None]) -> None:
        """Show ``guard`` every child a checkpoint restores before the optimizer has it."""

    def add_slot(self, var, slot_name: str, initializer="zeros") -> Any:
        """Create the slot ``slot_name`` of ``var``."""

    def step_scalars(self, learning_rate=None, dtype=None) -> Any:
        """The per-step scalars of the next step."""
