"""Arrays that are read only when used, so a conversion streams one tensor at a time.

A checkpoint's state dict holds LazyArrays: shape and dtype are known up front (the mapping
engine checks keys and shapes without touching data), ``np.asarray(x)`` reads the tensor and
applies the steps queued on it (float32 widening, a Linear transpose).  Nothing is cached:
the array lives only as long as its user keeps it, so writing a state dict of LazyArrays
holds one tensor in memory at a time (see ``converter.pdparams``).

A reader that uses one array at a time can pass a Scratch to ``read``: a transpose then fills
that one buffer instead of fresh memory.  Fresh memory costs a page fault per 4 KiB touched --
on a 384 MB checkpoint, more time than the transposing itself.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


class HasShape:
    """ndim and size from ``shape``, where np.ndim / np.size look for them."""

    __slots__ = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class LazyArray(HasShape):
    __slots__ = ("shape", "dtype", "_make")

    def __init__(self, make: Callable[[], np.ndarray], shape: tuple, dtype):
        self._make = make
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)

    def then(self, step: Callable[[np.ndarray], np.ndarray], shape=None, dtype=None) -> "LazyArray":
        """A LazyArray that applies ``step`` to this one's values when read."""
        make = self._make
        return LazyArray(lambda: step(make()), self.shape if shape is None else shape,
                         self.dtype if dtype is None else dtype)

    def read(self, scratch: Optional["Scratch"] = None) -> np.ndarray:
        """The values.  With ``scratch`` they may be left in that buffer, valid until its next
        use; without, they are the caller's to keep."""
        return self._make()

    def __array__(self, dtype=None, copy=None):
        return array_protocol(self._make(), dtype, copy)

    def __repr__(self) -> str:
        return f"LazyArray({self.dtype}, shape={self.shape})"


class _LazyTranspose(LazyArray):
    __slots__ = ("_source",)

    def __init__(self, source: LazyArray):
        super().__init__(lambda: _transpose_into(np.asarray(source), np.empty(source.shape[::-1], source.dtype)),
                         source.shape[::-1], source.dtype)
        self._source = source

    def read(self, scratch: Optional["Scratch"] = None) -> np.ndarray:
        if scratch is None:
            return self._make()
        return _transpose_into(np.asarray(self._source), scratch.array(self.shape, self.dtype))


class Scratch:
    """One buffer, reused by a sequence of reads whose results are used one at a time."""

    def __init__(self):
        self._buffer = np.empty(0, np.uint8)

    def array(self, shape: tuple, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self._buffer.size < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        return self._buffer[:nbytes].view(dtype).reshape(shape)


def array_protocol(values: np.ndarray, dtype=None, copy=None) -> np.ndarray:
    """What ``__array__(dtype, copy)`` must return for ``values``: numpy asks for a copy with
    copy=True (np.array) and trusts the answer."""
    if dtype is not None and values.dtype != np.dtype(dtype):
        return values.astype(dtype)
    return values.copy() if copy else values


CACHE_LINE_BYTES = 64


def _transpose_into(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """values.T written into the C-ordered ``out``.  Copied a band of rows at a time, each band
    as wide as a cache line is long, so every output line is written whole: ~3x faster than
    np.ascontiguousarray(values.T) on large Linear weights."""
    band = max(1, CACHE_LINE_BYTES // values.itemsize)
    for start in range(0, values.shape[0], band):
        out[:, start:start + band] = values[start:start + band].T
    return out


def transposed(value):
    """A 2-D array transposed and made contiguous (a Linear weight, torch (out, in) -> Paddle
    (in, out)); a LazyArray stays lazy."""
    if isinstance(value, LazyArray):
        return _LazyTranspose(value)
    values = np.asarray(value)
    return _transpose_into(values, np.empty(values.shape[::-1], values.dtype))


def materialize(state_dict: dict) -> dict:
    """Every value read into a numpy array (same keys, same order)."""
    return {k: np.asarray(v) for k, v in state_dict.items()}
