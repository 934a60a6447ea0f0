"""Arrays on disk: a JSON index of (key, dtype, shape, offset, nbytes) and the raw bytes one
after another, as checkpoints and log records both hold them (FORMATS.md, "Arrays")."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from radam_dist.ps.tensors import numpy_dtype


def pack_arrays(arrays: Dict[str, np.ndarray]) -> Tuple[list, List[memoryview]]:
    """(index, buffers): the index goes into the metadata JSON, the buffers follow it as they
    are (C order, the machine's byte order), so writing costs no copy."""
    index, buffers, offset = [], [], 0
    for key, array in arrays.items():
        array = np.asarray(array, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        index.append({"key": key, "dtype": array.dtype.name, "shape": list(array.shape),
                      "offset": offset, "nbytes": int(array.nbytes)})
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b""))
        offset += array.nbytes
    return index, buffers


def unpack_arrays(index: list, blob: memoryview) -> Dict[str, np.ndarray]:
    """The arrays ``index`` describes, copied out of ``blob``; ValueError where one runs past
    its end (the caller's checksum passed, so only a bug or a forged file gets here)."""
    out = {}
    for item in index:
        start, end = item["offset"], item["offset"] + item["nbytes"]
        if end > len(blob):
            raise ValueError(f"array {item['key']!r} runs past the end of the data")
        out[item["key"]] = np.frombuffer(blob[start:end], dtype=numpy_dtype(item["dtype"])).reshape(
            item["shape"]).copy()
    return out
