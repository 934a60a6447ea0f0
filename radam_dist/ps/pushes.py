"""What a push carries (``Gradient``), what it answers (``PushResult``), and the mean of a
sync round (``average``).

Plain numpy, so that the log format (storage) and the round coordinator can use them without
TensorFlow."""

from __future__ import annotations

import collections
from typing import Dict, Iterable, List, NamedTuple, Optional

import numpy as np


class Gradient(NamedTuple):
    """A dense gradient (``indices is None``) or the rows ``indices`` of a sparse one."""

    values: np.ndarray
    indices: Optional[np.ndarray] = None

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (0 if self.indices is None else int(self.indices.nbytes))


class PushResult(NamedTuple):
    """What a push answers (the fields of ``PushResponse``)."""

    version: int
    step: int
    skipped: bool = False  # not finite (--nonfinite skip): counted, not applied
    duplicate: bool = False  # this request id was applied before
    staged: bool = False  # sync: held for its round, nothing applied yet


def average(pushes: Iterable[Dict[str, Gradient]]) -> Dict[str, Gradient]:
    """The mean gradient of a sync round, per variable over the pushes that carry it.

    Dense gradients are summed in worker order and divided by their count; sparse ones are
    concatenated with values divided by the count (RAdam sums duplicate rows), which is the
    same mean. A variable with both kinds in one round is densified.
    """
    by_name: Dict[str, List[Gradient]] = collections.defaultdict(list)
    for grads in pushes:
        for name, grad in grads.items():
            by_name[name].append(grad)
    out = {}
    for name, grads in by_name.items():
        count = len(grads)
        if all(g.is_sparse for g in grads):
            values = np.concatenate([g.values for g in grads]) / np.asarray(count, grads[0].values.dtype)
            indices = np.concatenate([g.indices.astype(np.int64) for g in grads])
            out[name] = Gradient(values.astype(grads[0].values.dtype, copy=False), indices)
            continue
        dense_shape = next(g.values.shape for g in grads if not g.is_sparse)
        total = np.zeros(dense_shape, grads[0].values.dtype)
        for g in grads:
            if g.is_sparse:
                np.add.at(total, g.indices, g.values)
            else:
                total += g.values
        out[name] = Gradient(total / np.asarray(count, total.dtype))
    return out
