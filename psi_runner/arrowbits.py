"""Small zero-copy views between Arrow and numpy, shared by the data path's modules."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def int64_array(values: np.ndarray) -> pa.Array:
    """An int64 Arrow array over a numpy array (pa.array() on numpy would import pandas)."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Int64Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def string_parts(arr: pa.Array) -> tuple[np.ndarray, pa.Buffer | None]:
    """A text array's offsets (its own slice of them, n + 1) and its data buffer, no copy."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    n, buffers = len(arr), arr.buffers()
    if buffers[1] is None or not n:  # an empty array may have no offsets at all
        return np.zeros(1, dtype=width), None
    return np.frombuffer(buffers[1], dtype=width)[arr.offset : arr.offset + n + 1], buffers[2]
