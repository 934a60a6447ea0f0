"""Which shard holds which rows of which variable: a stable rule every worker computes alike.

* A variable smaller than ``split_threshold_bytes`` (or 0-d, or with fewer rows than shards)
  lives whole on shard ``crc32(name) % num_shards`` -- crc32, not Python's salted ``hash``,
  so every process agrees.
* A larger one (an embedding table) is split by rows into ``num_shards`` contiguous ranges,
  range i on shard i. RAdam is elementwise, so its slots split with the rows and the update
  of each piece is exactly the update of those rows.
"""

from __future__ import annotations

import zlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


class Piece(NamedTuple):
    shard: int
    row_start: int
    row_end: int  # exclusive; for whole variables, the row count (0 for 0-d)


class VariablePlacement(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    pieces: Tuple[Piece, ...]

    @property
    def is_split(self) -> bool:
        return len(self.pieces) > 1


def shard_of(name: str, num_shards: int) -> int:
    return zlib.crc32(name.encode("utf-8")) % num_shards


def place(name: str, shape: Sequence[int], nbytes: int, num_shards: int,
          split_threshold_bytes: int) -> VariablePlacement:
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if shape else 0
    if num_shards > 1 and shape and rows >= num_shards and nbytes >= split_threshold_bytes:
        bounds = np.linspace(0, rows, num_shards + 1).round().astype(int)
        pieces = tuple(Piece(i, int(bounds[i]), int(bounds[i + 1])) for i in range(num_shards))
    else:
        pieces = (Piece(shard_of(name, num_shards), 0, rows),)
    return VariablePlacement(name, shape, pieces)


def placement_from_stats(stats: List[dict]) -> Dict[str, VariablePlacement]:
    """Rebuild the placement from the shards' Stats (for a worker that attaches later)."""
    found: Dict[str, list] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for shard, s in enumerate(stats):
        for v in s["variables"]:
            shape = tuple(v["shape"])
            rows = shape[0] if shape else 0
            found.setdefault(v["name"], []).append(Piece(shard, v["row_start"], v["row_start"] + rows))
            total = v["total_rows"]
            shapes[v["name"]] = (total,) + shape[1:] if shape else ()
    return {name: VariablePlacement(name, shapes[name], tuple(sorted(p, key=lambda x: x.row_start)))
            for name, p in found.items()}


def split_dense(placement: VariablePlacement, array: np.ndarray) -> Dict[int, np.ndarray]:
    if not placement.is_split:
        return {placement.pieces[0].shard: array}
    return {p.shard: array[p.row_start:p.row_end] for p in placement.pieces}


def split_sparse(placement: VariablePlacement, values: np.ndarray,
                 indices: np.ndarray) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """Route the rows of a sparse gradient; every piece gets an entry (maybe empty), so each
    shard takes the step (its m and v decay) exactly as an unsplit variable would."""
    indices = np.asarray(indices)
    if not placement.is_split:
        return {placement.pieces[0].shard: (values, indices)}
    out = {}
    for p in placement.pieces:
        mask = (indices >= p.row_start) & (indices < p.row_end)
        out[p.shard] = (values[mask], (indices[mask] - p.row_start).astype(indices.dtype))
    # Out-of-range rows go to the last / first shard unchanged, so the server refuses them.
    stray = (indices < 0) | (indices >= placement.pieces[-1].row_end)
    if stray.any():
        last = placement.pieces[-1]
        v, i = out[last.shard]
        out[last.shard] = (np.concatenate([v, values[stray]]),
                           np.concatenate([i, indices[stray] - last.row_start]).astype(indices.dtype))
    return out


def join(placement: VariablePlacement, parts: Dict[int, np.ndarray]) -> Optional[np.ndarray]:
    if not placement.is_split:
        return parts.get(placement.pieces[0].shard)
    if any(p.shard not in parts for p in placement.pieces):
        return None
    return np.concatenate([parts[p.shard] for p in placement.pieces], axis=0)
