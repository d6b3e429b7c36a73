"""Writing .pdparams -- a pickled dict of numpy arrays, what ``paddle.load`` reads -- one
tensor at a time.

``pickle.dump`` of a state dict holds the model twice over: pickling an ndarray copies it into
a bytes object, and the pickler's memo keeps every one of those alive until the end.  This
writer streams instead: LazyArrays are read only shortly before their turn (a worker thread
reads the next few -- maps, checks, transposes -- while the current one is written; numpy
copies, CRC checks and file writes all release the GIL), array data goes from the array's
memory straight into the file, and nothing is memoised (a state dict of arrays shares
nothing).  The bytes are exactly what ``pickle.dump`` (protocol 4) writes for the same arrays
with its memo off.
"""
from __future__ import annotations

import pickle
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np


PROTOCOL = 4
# numpy's own reconstructor and its arguments, as ndarray.__reduce__ gives them.
_RECONSTRUCT, _RECONSTRUCT_ARGS, _ = np.empty(0).__reduce__()


class _Slot:
    """Stands for the n-th value of the state dict while it is being read ahead."""

    def __init__(self, index: int):
        self.index = index


class _ReadAhead:
    """Reads the state dict's values in order on a worker thread, at most ``depth`` ahead of
    the one being written."""

    def __init__(self, values: list, pool: ThreadPoolExecutor, depth: int):
        self.values, self.pool, self.depth = values, pool, depth
        self.pending: deque = deque()
        self.submitted = 0

    def take(self, index: int) -> np.ndarray:
        while self.submitted < min(index + 1 + self.depth, len(self.values)):
            value = self.values[self.submitted]
            self.pending.append(self.pool.submit(np.asarray, value))
            self.values[self.submitted] = None  # the reader owns it now
            self.submitted += 1
        return self.pending.popleft().result()


class _StreamingPickler(pickle._Pickler):
    """The pure-Python pickler (the C one cannot write a buffer without copying it to bytes)."""

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[memoryview] = pickle._Pickler.save_bytes  # an array's memory, written as BINBYTES

    def __init__(self, file, read_ahead: _ReadAhead):
        super().__init__(file, protocol=PROTOCOL)
        self.fast = True  # no memo: it would keep every written array alive
        self.read_ahead = read_ahead

    def reducer_override(self, obj):
        if isinstance(obj, _Slot):
            obj = self.read_ahead.take(obj.index)
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            return array_reduction(obj)
        return NotImplemented


def array_reduction(array: np.ndarray) -> tuple:
    """``array.__reduce__()``, with the data as a view of the array's memory (in the C or
    Fortran order numpy's pickling uses) instead of a copy wherever the layout allows."""
    fortran = array.flags.f_contiguous and not array.flags.c_contiguous
    if array.flags.c_contiguous or fortran:
        data = memoryview(array.ravel(order="F" if fortran else "C")).cast("B")
    else:
        data = array.tobytes()
    return _RECONSTRUCT, _RECONSTRUCT_ARGS, (1, array.shape, array.dtype, fortran, data)


def write_pdparams(state_dict: dict, file, read_ahead: int = 2) -> None:
    """Pickle ``state_dict`` (numpy arrays or LazyArrays) into the open binary ``file``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdparams-read-ahead")
    try:
        ahead = _ReadAhead(list(state_dict.values()), pool, read_ahead)
        slots = {key: _Slot(i) for i, key in enumerate(state_dict)}
        _StreamingPickler(file, ahead).dump(slots)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
