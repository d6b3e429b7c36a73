"""Arrays that are read only when used, so a conversion streams one tensor at a time.

A checkpoint's state dict holds LazyArrays: shape and dtype are known up front (the mapping
engine checks keys and shapes without touching data), ``np.asarray(x)`` reads the tensor and
applies the steps queued on it (float32 widening, a Linear transpose).  Nothing is cached:
the array lives only as long as its user keeps it, so writing a state dict of LazyArrays
holds one tensor in memory at a time (see ``converter.pdparams``).

A reader that uses one array at a time can pass a Scratch to ``read``: a transpose then fills
that one buffer instead of fresh memory.  Fresh memory costs a page fault per 4 KiB touched --
on a 384 MB checkpoint, more time than the transposing itself.

An array read straight from a file may also say where its bytes lie (``file_span``), so a writer
can copy them file to file without reading them at all; and integrity checks of what is read
(a zip record's CRC-32) can run on a second thread while the data is used (``checks_in_background``).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class FileSpan:
    """An array's values as one run of bytes in an open file, laid out exactly as the C-ordered
    array would hold them in memory.  Copying them bypasses the read that checks them, so the
    copier must call ``check`` (it raises if the bytes fail their integrity check)."""

    fd: int
    offset: int
    nbytes: int
    check: Callable[[], None]


_BACKGROUND_CHECKS = contextvars.ContextVar("background_checks", default=None)


@contextlib.contextmanager
def checks_in_background():
    """Inside the block, ``run_check`` hands checks to one background thread, and the caller goes
    on with the data meanwhile; the block ends only once every check has passed, and re-raises
    the first failure.  A writer that commits its output after the block never commits data that
    failed its check, and on two cores the checks cost no wall time (zlib.crc32 releases the GIL)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="integrity-check")
    pending: list = []
    token = _BACKGROUND_CHECKS.set((pool, pending))
    try:
        yield
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        _BACKGROUND_CHECKS.reset(token)
    pool.shutdown(wait=True)
    for future in pending:
        future.result()


# Smaller checks run at once even inside checks_in_background: handing one to the other thread
# costs more than it does, and the two threads' turns at the GIL cost more still.
BACKGROUND_CHECK_MIN_BYTES = 256 * 1024


def run_check(check: Callable[[], None], nbytes: int) -> None:
    """Run ``check`` (of ``nbytes`` of data) now, or on the background thread inside
    ``checks_in_background``."""
    background = _BACKGROUND_CHECKS.get()
    if background is None or nbytes < BACKGROUND_CHECK_MIN_BYTES:
        check()
    else:
        pool, pending = background
        pending.append(pool.submit(check))


class HasShape:
    """ndim and size from ``shape``, where np.ndim / np.size look for them."""

    __slots__ = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class LazyArray(HasShape):
    __slots__ = ("shape", "dtype", "_make", "_file_span")

    def __init__(self, make: Callable[[], np.ndarray], shape: tuple, dtype,
                 file_span: Optional[Callable[[], Optional[FileSpan]]] = None):
        self._make = make
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._file_span = file_span

    def file_span(self) -> Optional[FileSpan]:
        """Where the values lie in a file as they would in memory, if they do (None once any
        step is queued on them)."""
        return self._file_span() if self._file_span is not None else None

    def then(self, step: Callable[[np.ndarray], np.ndarray], dtype=None) -> "LazyArray":
        """A LazyArray that applies ``step`` (same shape) to this one's values when read."""
        make = self._make
        return LazyArray(lambda: step(make()), self.shape, self.dtype if dtype is None else dtype)

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
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
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
