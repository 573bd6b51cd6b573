"""Token-id tuples that share their int objects.

A Python int costs 28 bytes; a trace of tens of millions of tokens built from fresh ints (JSON parsing,
``numpy.tolist``) would cost gigabytes. Drawing every id from one table of int objects makes a token cost
only its 8-byte reference in the tuple.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


class SharedInts:
    """Turns arrays of non-negative ids into tuples of shared int objects."""

    def __init__(self) -> None:
        self._ints = np.empty(0, dtype=object)

    def _cover(self, largest: int) -> None:
        if largest >= len(self._ints):
            self._ints = np.array(list(range(largest + 1)), dtype=object)

    def shared_list(self, ids: np.ndarray | Sequence[int]) -> list[int]:
        """``ids`` as a list of shared int objects."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return []
        self._cover(int(ids.max()))
        return self._ints[ids].tolist()

    def tuple_of(self, ids: np.ndarray | Sequence[int]) -> tuple[int, ...]:
        return tuple(self.shared_list(ids))

    def tuples_of_column(self, column: pa.ChunkedArray) -> list[tuple[int, ...]]:
        """Every row of an Arrow list-of-int column as a tuple."""
        rows: list[tuple[int, ...]] = []
        for chunk in column.chunks:
            values = self.shared_list(chunk.flatten().to_numpy(zero_copy_only=False))
            offsets = chunk.offsets.to_numpy()
            offsets = offsets - offsets[0]
            rows.extend(tuple(values[offsets[i] : offsets[i + 1]]) for i in range(len(chunk)))
        return rows
