"""Writing .pdparams -- a pickled dict of numpy arrays, what ``paddle.load`` reads -- one
tensor at a time, in no more memory than the tensor at hand.

``pickle.dump`` of a state dict holds the model twice over: pickling an ndarray copies it into
a new bytes object, and the pickler's memo keeps every one of those alive until the end.  This
writer turns the memo off (a state dict of arrays shares nothing), reads each LazyArray only
when its turn comes (a transpose into one reused Scratch buffer), and writes array data from
the array's own memory -- for most tensors a mapping of the checkpoint file.  No fresh memory
per tensor also means no page faults per tensor, which on a 384 MB checkpoint cost more than
the copying.  The bytes are exactly what ``pickle.dump`` (protocol 4) writes for the same
arrays with its memo off.
"""
from __future__ import annotations

import pickle

import numpy as np

from .lazy import LazyArray, Scratch

PROTOCOL = 4
# numpy's own reconstructor and its arguments, as ndarray.__reduce__ gives them.
_RECONSTRUCT, _RECONSTRUCT_ARGS, _ = np.empty(0).__reduce__()


class _StreamingPickler(pickle._Pickler):
    """The pure-Python pickler: the C one cannot write a buffer without first copying it into
    a bytes object.  Each value is written before the next is read, so one Scratch serves all."""

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[memoryview] = pickle._Pickler.save_bytes  # an array's memory, written as BINBYTES

    def __init__(self, file):
        super().__init__(file, protocol=PROTOCOL)
        self.fast = True  # no memo: it would keep every written array alive
        self.scratch = Scratch()

    def reducer_override(self, obj):
        if isinstance(obj, LazyArray):
            obj = obj.read(self.scratch)
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


def write_pdparams(state_dict: dict, file) -> None:
    """Pickle ``state_dict`` (numpy arrays or LazyArrays) into the open binary ``file``."""
    _StreamingPickler(file).dump(state_dict)
