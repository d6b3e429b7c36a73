"""Writing .pdparams -- a pickled dict of numpy arrays, what ``paddle.load`` reads -- one tensor
at a time, with the array data going around the pickler.

The file is a protocol-4 pickle, written here opcode by opcode: the opcodes ``pickle.dump``
writes for the same dict with its memo off, minus the optional FRAME markers.  Nearly all of
the file is array data, and none of it passes through a pickler:

  - a tensor the conversion leaves untouched (most of a checkpoint, unless its Linears need
    transposing) is copied from the checkpoint file into the output inside the kernel
    (``os.copy_file_range``), never read into this process at all;
  - any other tensor is read (a transpose into one reused Scratch buffer) and written from
    the array's own memory.

Integrity checks of what is read or copied (a zip record's CRC-32) run on a second thread
meanwhile, and all have passed before ``write_pdparams`` returns; a failure raises, so the
caller never commits the file (converter.checkpoint.atomic_write).  Memory stays at one
tensor; the pickler's memo, which would keep every array alive, is never used.
"""
from __future__ import annotations

import errno
import io
import os
import struct
from typing import Optional

import numpy as np

from .lazy import FileSpan, LazyArray, Scratch, checks_in_background

# numpy's own reconstructor and its arguments, as ndarray.__reduce__ gives them.
_RECONSTRUCT, _RECONSTRUCT_ARGS, _ = np.empty(0).__reduce__()
_SETITEMS_BATCH = 1000  # items per SETITEMS, as pickle batches them


# --- opcodes (the names are pickle's) -------------------------------------------------------------

def _int(n: int) -> bytes:
    if 0 <= n <= 0xFF:
        return b"K" + bytes([n])  # BININT1
    if 0 <= n <= 0xFFFF:
        return b"M" + struct.pack("<H", n)  # BININT2
    if -0x80000000 <= n <= 0x7FFFFFFF:
        return b"J" + struct.pack("<i", n)  # BININT
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)  # pickle.encode_long
    return b"\x8a" + bytes([len(data)]) + data  # LONG1 (shapes never need LONG4)


def _str(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE
    if len(data) <= 0xFFFFFFFF:
        return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
    return b"\x8d" + struct.pack("<Q", len(data)) + data  # BINUNICODE8


def _bytes_header(nbytes: int) -> bytes:
    if nbytes < 256:
        return b"C" + bytes([nbytes])  # SHORT_BINBYTES
    if nbytes <= 0xFFFFFFFF:
        return b"B" + struct.pack("<I", nbytes)  # BINBYTES
    return b"\x8e" + struct.pack("<Q", nbytes)  # BINBYTES8


def _tuple(items: tuple) -> bytes:
    body = b"".join(_object(i) for i in items)
    if not items:
        return b")"  # EMPTY_TUPLE
    if len(items) <= 3:
        return body + b"\x85\x86\x87"[len(items) - 1:len(items)]  # TUPLE1 / TUPLE2 / TUPLE3
    return b"(" + body + b"t"  # MARK ... TUPLE


def _global(obj) -> bytes:
    return _str(obj.__module__) + _str(obj.__qualname__) + b"\x93"  # STACK_GLOBAL


def _object(obj) -> bytes:
    """The few kinds of object an array's pickle holds besides its data."""
    if obj is None:
        return b"N"
    if obj is True or obj is False:
        return b"\x88" if obj else b"\x89"  # NEWTRUE / NEWFALSE
    if isinstance(obj, int):
        return _int(obj)
    if isinstance(obj, str):
        return _str(obj)
    if isinstance(obj, bytes):
        return _bytes_header(len(obj)) + obj
    if isinstance(obj, tuple):
        return _tuple(obj)
    if isinstance(obj, type) or callable(obj):
        return _global(obj)
    raise TypeError(f"cannot write {type(obj).__name__} into a .pdparams")


def _reduce(function, args: tuple, state=None) -> bytes:
    """``function(*args)`` then, with a state, BUILD: what pickle writes for a __reduce__ result."""
    out = _object(function) + _tuple(args) + b"R"  # REDUCE
    return out if state is None else out + _object(state) + b"b"  # BUILD


# An array pickles as _reconstruct(ndarray, (0,), b'b') built with the state
# (1, shape, dtype, is_fortran, data): everything up to the shape is the same for every array.
_ARRAY_HEAD = _reduce(_RECONSTRUCT, _RECONSTRUCT_ARGS) + b"(" + _int(1)  # ... MARK 1
_ARRAY_TAIL = b"tb"  # TUPLE (the state) and BUILD
_DTYPES: dict = {}


def _dtype(dtype: np.dtype) -> bytes:
    if dtype not in _DTYPES:
        _DTYPES[dtype] = _reduce(*dtype.__reduce__())
    return _DTYPES[dtype]


def _array_head(shape: tuple, dtype: np.dtype, fortran: bool, nbytes: int) -> bytes:
    return _ARRAY_HEAD + _tuple(tuple(int(n) for n in shape)) + _dtype(dtype) + _object(fortran) + _bytes_header(nbytes)


# --- output -----------------------------------------------------------------------------------------

class _Output:
    """Writes to ``file``: small pieces gathered in a buffer, array data straight from its
    memory, and file spans copied by the kernel when ``file`` is a real file."""

    BUFFER = 1 << 20
    SMALL_DATA = 1 << 16  # array data below this joins the buffer instead of its own write

    def __init__(self, file):
        self.file = file
        self.buffer = bytearray()
        self.fd = _file_descriptor(file)
        if self.fd is not None:
            file.flush()  # from here on everything goes to the descriptor, in order
        self.can_copy = self.fd is not None and hasattr(os, "copy_file_range")

    def write(self, data) -> None:
        self.buffer += data
        if len(self.buffer) >= self.BUFFER:
            self.flush()

    def write_data(self, data: memoryview) -> None:
        if len(data) < self.SMALL_DATA:
            self.write(data)
        else:
            self.flush()
            self._write_through(data)

    def copy(self, span: FileSpan) -> bool:
        """Copy ``span`` from its file into the output in the kernel; False (nothing written) where
        the kernel cannot, and the caller writes the data itself."""
        if not self.can_copy:
            return False
        self.flush()
        offset, left = span.offset, span.nbytes
        while left:
            try:
                copied = os.copy_file_range(span.fd, self.fd, left, offset)
            except OSError as exc:
                if offset == span.offset and exc.errno in _NO_KERNEL_COPY:
                    self.can_copy = False  # and for every later span too
                    return False
                raise
            if copied == 0:
                if offset == span.offset:  # some file systems copy nothing rather than refuse
                    self.can_copy = False
                    return False
                raise OSError(errno.EIO, "the checkpoint file ended during the copy (changed while reading?)")
            offset, left = offset + copied, left - copied
        return True

    def flush(self) -> None:
        if self.buffer:
            self._write_through(memoryview(self.buffer))
            self.buffer = bytearray()

    def _write_through(self, data: memoryview) -> None:
        if self.fd is None:
            self.file.write(data)
            return
        while len(data):
            data = data[os.write(self.fd, data):]


# The file system or kernel has no in-kernel copy for this pair of files: write instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


def _file_descriptor(file) -> Optional[int]:
    """The descriptor of a plain file opened with open(..., "wb"), else None (a wrapper such as
    gzip.GzipFile also has fileno(), but bytes written there would bypass it)."""
    if not isinstance(file, (io.BufferedWriter, io.FileIO)):
        return None
    try:
        return file.fileno()
    except (io.UnsupportedOperation, OSError):
        return None


# --- the writer ---------------------------------------------------------------------------------------

def write_pdparams(state_dict: dict, file) -> None:
    """Pickle ``state_dict`` (str -> numpy array or LazyArray) into the open binary ``file``."""
    out, scratch = _Output(file), Scratch()
    items = list(state_dict.items())
    with checks_in_background():
        out.write(b"\x80\x04}")  # PROTO 4, EMPTY_DICT
        for start in range(0, len(items), _SETITEMS_BATCH):
            batch = items[start:start + _SETITEMS_BATCH]
            if len(batch) > 1:
                out.write(b"(")  # MARK
            for key, value in batch:
                out.write(_str(key))
                _write_array(out, value, scratch)
            out.write(b"u" if len(batch) > 1 else b"s")  # SETITEMS / SETITEM
        out.write(b".")  # STOP
        out.flush()


def _write_array(out: _Output, value, scratch: Scratch) -> None:
    span = (value.file_span() if isinstance(value, LazyArray) and out.can_copy
            and value.size * value.dtype.itemsize >= out.SMALL_DATA else None)  # small: read and buffered
    if span is not None:
        out.write(_array_head(value.shape, value.dtype, False, span.nbytes))
        if out.copy(span):
            span.check()  # copied unread: verify what was copied
        else:
            out.write_data(_data(np.asarray(value))[1])
    else:
        array = value.read(scratch) if isinstance(value, LazyArray) else np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError("object arrays cannot be written into a .pdparams")
        fortran, data = _data(array)
        out.write(_array_head(array.shape, array.dtype, fortran, len(data)))
        out.write_data(data)
    out.write(_ARRAY_TAIL)


def _data(array: np.ndarray) -> tuple:
    """(is_fortran, data) as numpy's pickling gives them, the data a view of the array's memory
    (in the C or Fortran order numpy uses) instead of a copy wherever the layout allows."""
    fortran = array.flags.f_contiguous and not array.flags.c_contiguous
    if array.flags.c_contiguous or fortran:
        return fortran, memoryview(array.ravel(order="F" if fortran else "C")).cast("B")
    return fortran, memoryview(array.tobytes())
