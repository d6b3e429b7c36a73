"""Read PyTorch checkpoint files with the standard library and numpy alone, never running code.

    tree = load(path)    # the saved object: dicts, lists, scalars ..., every tensor a TensorView
    tree["model"]["head.weight"].numpy()    # reads that one tensor (a read-only view of the file)

Formats
    zip     what ``torch.save`` writes since torch 1.6: ``<archive>/data.pkl`` (the object tree)
            and ``<archive>/data/<key>`` (one record per storage, stored uncompressed).
    legacy  what torch < 1.6 and ``_use_new_zipfile_serialization=False`` write: five pickles in
            a row (magic number, protocol version, system info, the object tree, the list of
            storage keys), then every storage as an int64 element count followed by its bytes.

Nothing is read until a tensor is materialised: then its storage record alone is memory-mapped
(small records are simply read) and, in a zip, checked against its CRC-32 the first time, and
unmapped once no array views it -- so a conversion keeps only the tensors in use resident, never
a copy of the checkpoint.  Views are
kept exactly as torch saved them: storage offset, strides (non-contiguous and shared-storage
tensors), 0-d tensors.

Safety: the object tree is unpickled by an unpickler whose ``find_class`` is a lookup in a fixed
table, so no module is imported and nothing the file names is ever called except:
  - our own rebuild functions for torch tensors, parameters and storages (they only record
    where the bytes are), ``collections.OrderedDict``, ``set``/``frozenset``/``complex``, and
    the latin-1 ``_codecs.encode`` that protocol-2 pickles use for bytes;
  - INERT_GLOBALS: the training-state objects real checkpoints carry (argparse.Namespace, config
    nodes, paths, numpy scalars ...) become inert placeholders that record what the pickle says
    about them and are never called.
Any other global is refused (RefusedGlobal, naming it) before anything is built.  There is no
option to relax this.
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import weakref
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import UserError, first_sentence
from .lazy import FileSpan, HasShape, array_protocol, run_check

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch dtype name -> numpy type of its elements as stored.  numpy has no bfloat16: those
# tensors read as their raw bits (uint16); bfloat16_to_float32 widens them exactly.
ELEMENT_TYPES = {
    "float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2",
    "complex128": "c16", "complex64": "c8",
    "int64": "i8", "int32": "i4", "int16": "i2", "int8": "i1",
    "uint64": "u8", "uint32": "u4", "uint16": "u2", "uint8": "u1", "bool": "?",
}
# Typed storage classes as torch pickles them (torch.FloatStorage ...).
STORAGE_CLASSES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
}
# Other names of the dtype objects ``torch.<name>`` (only _rebuild_tensor_v3 pickles one).
DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "cfloat": "complex64",
                 "cdouble": "complex128", "long": "int64", "int": "int32", "short": "int16"}

# Objects of these classes are stored as inert placeholders: kept in the tree, never built.
INERT_GLOBALS = frozenset({
    "argparse.Namespace", "types.SimpleNamespace", "yacs.config.CfgNode", "easydict.EasyDict",
    "lightning_fabric.utilities.data.AttributeDict", "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",  # Lightning's hyper_parameters
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
    "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta",
    "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "torch.device",
})
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only; elsewhere pages fault in as read
# Python 2 names that protocol <= 2 pickles use for stdlib modules.
PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class TorchFileError(UserError):
    """The file is not a readable torch checkpoint; the message is one line naming the file."""


class RefusedGlobal(TorchFileError):
    """The pickle asks for a global that a checkpoint has no need for."""

    def __init__(self, path, global_name: str):
        super().__init__(f"{path}: refused global '{global_name}': a checkpoint needs only tensors, "
                         f"containers and plain training state, and torch2paddle never runs code from a file")
        self.global_name = global_name


class _Refused(Exception):
    """Raised inside the unpickler; load() adds the path."""


class _Corrupt(Exception):
    """Raised inside the reader for malformed content; load() adds the path."""


# --- tensors ---------------------------------------------------------------------------------

class _Sealed:
    """What a pickle can name or build but must not change: pickle's BUILD opcode calls
    ``__setstate__``, which refuses (and the shared markers have no ``__dict__`` to update
    instead).  Built-in types (OrderedDict, set, tuple ...) are immutable already; inert classes
    are made afresh for every load."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Corrupt(f"the pickle tries to modify {self!r}")


class Storage:
    """One storage record of a file.  ``read()`` returns its bytes (uint8, read-only), read from
    the file each time it is asked for (nothing is cached) and checked the first time (``verify``: a zip record's CRC-32,
    given the bytes as a sequence of chunks); ``nbytes`` is what the pickle says the record
    holds.  ``locate``, where the file holds the record plainly, gives (file descriptor, offset,
    length), for copying without reading."""

    def __init__(self, path, name: str, nbytes: int, read: Callable[[], np.ndarray], byteorder: str = "<",
                 verify: Optional[Callable[[Iterable], None]] = None, locate: Optional[Callable[[], tuple]] = None):
        self.path = path
        self.name = name
        self.nbytes = nbytes
        self.byteorder = byteorder
        self._read = read
        self._verify = verify
        self._verified = verify is None
        self._locate = locate

    def read(self) -> np.ndarray:
        """Errors surface here, possibly long after load(): as TorchFileError naming the file
        (inside lazy.checks_in_background, a failed check surfaces at the end of that block)."""
        try:
            data = self._read()
        except _Corrupt as exc:
            raise TorchFileError(f"{self.path}: {exc}") from None
        if data.size != self.nbytes:
            raise TorchFileError(f"{self.path}: {self.name} holds {data.size} bytes, the pickle expects "
                                 f"{self.nbytes} (corrupted checkpoint)")
        self.ensure_checked(data)
        return data

    def ensure_checked(self, data: Optional[np.ndarray] = None) -> None:
        """Verify the record once (``data``: its bytes, if already at hand)."""
        if not self._verified:
            self._verified = True  # a check that fails resets it
            run_check(lambda: self._run_check(data), self.nbytes)

    def _run_check(self, data: Optional[np.ndarray]) -> None:
        try:
            self._verify([data] if data is not None else self._chunks())
        except _Corrupt as exc:
            self._verified = False
            raise TorchFileError(f"{self.path}: {exc}") from None

    def _chunks(self, size: int = 1 << 20):
        """The record's bytes as consecutive chunks, read into one reused buffer: a check of
        bytes the caller does not otherwise need maps nothing (unmapping in a two-thread
        process interrupts the other core).  Only FileSpan checks get here: there is a ``locate``."""
        fd, offset, length = self._locate()
        buffer = memoryview(bytearray(min(size, length)))
        while length:
            n = os.preadv(fd, [buffer[:min(size, length)]], offset)
            if n == 0:
                raise _Corrupt("the file ends early (truncated?)")
            yield buffer[:n]
            offset, length = offset + n, length - n

    def file_span(self, start: int, nbytes: int) -> Optional[FileSpan]:
        """Bytes [start, start + nbytes) of the record as a FileSpan, if the file holds the
        record plainly and whole (anything else is left to read() to read or to report)."""
        if self._locate is None or start + nbytes > self.nbytes:
            return None
        try:
            fd, offset, length = self._locate()
        except _Corrupt:
            return None
        if length != self.nbytes:
            return None
        return FileSpan(fd, offset + start, nbytes, self.ensure_checked)


@dataclass(frozen=True)
class _TypedStorage(_Sealed):
    """A storage as the pickle references it: with the element type its class names, and (legacy
    storage views only) an element offset into the record."""

    storage: Storage
    dtype: str
    offset: int = 0


@dataclass(frozen=True, eq=False)
class TensorView(HasShape, _Sealed):
    """A tensor as the file describes it: dtype (torch's name), shape, strides and offset (in
    elements) into a storage record.  Nothing is read until ``numpy()``; ``np.asarray(view)``
    gives the values (bfloat16 widened to float32)."""

    storage: Storage
    dtype: str
    shape: tuple
    stride: tuple
    offset: int

    def numpy(self) -> np.ndarray:
        """The elements as stored, as a read-only array viewing the file with the saved strides
        (bfloat16 as raw uint16 bits)."""
        element = np.dtype(ELEMENT_TYPES[self.dtype]).newbyteorder(self.storage.byteorder)
        span = self._span()
        start = self.offset * element.itemsize
        raw = self.storage.read()
        if span and start + span * element.itemsize > raw.size:
            raise TorchFileError(f"{self.storage.path}: a {self.dtype} tensor of shape {self.shape} runs past "
                                 f"the end of {self.storage.name} (corrupted checkpoint)")
        base = raw[start:start + span * element.itemsize].view(element)
        if self._dense():
            array = base.reshape(self.shape)  # the common case, and 10x cheaper than as_strided
        else:
            array = as_strided(base, self.shape, tuple(s * element.itemsize for s in self.stride), writeable=False)
        return array if element.isnative else array.astype(element.newbyteorder("="))

    def file_span(self) -> Optional[FileSpan]:
        """The tensor's bytes as one run of the file, if the file holds them exactly as the
        tensor's C-ordered numpy array would (native byte order, dense C strides)."""
        element = np.dtype(ELEMENT_TYPES[self.dtype]).newbyteorder(self.storage.byteorder)
        if self.dtype == "bfloat16" or not element.isnative or self.size == 0 or not self._dense():
            return None
        return self.storage.file_span(self.offset * element.itemsize, self.size * element.itemsize)

    def _dense(self) -> bool:
        """Whether the elements lie in C order with no gaps (strides of size-1 dims do not matter)."""
        return all(n == 1 or s == c for n, s, c in zip(self.shape, self.stride, contiguous_strides(self.shape)))

    def _span(self) -> int:
        """Elements from the first to one past the last element the view touches (0 if empty)."""
        if any(n == 0 for n in self.shape):
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))

    def __array__(self, dtype=None, copy=None):
        values = self.numpy()
        if self.dtype == "bfloat16":  # a fresh array already
            return array_protocol(bfloat16_to_float32(values), dtype, copy=False)
        return array_protocol(values, dtype, copy)

    def __repr__(self) -> str:
        return f"TensorView({self.dtype}, shape={self.shape}, {self.storage.name})"


def contiguous_strides(shape: tuple) -> tuple:
    """Element strides of a C-ordered array of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def tensor_order(array: np.ndarray) -> str:
    """The memory order torch gives a dtype conversion of this tensor (``Tensor.to``, preserve
    format): the same layout when the strides are dense and non-overlapping, else C order."""
    dims = sorted((s // array.itemsize, n) for n, s in zip(array.shape, array.strides) if n != 1)
    expected = 1
    for stride, n in dims:
        if stride != expected:
            return "C"
        expected *= n
    return "K"


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 raw bits -> float32, exactly (a bfloat16 is the top half of a float32)."""
    wide = bits.astype(np.uint32, order=tensor_order(bits))
    wide <<= 16
    return wide.view(np.float32)


def widen_to_float32(values: np.ndarray) -> np.ndarray:
    """float16 / float64 -> float32, laid out as torch's ``.float()`` would be."""
    return values.astype(np.float32, order=tensor_order(values))


# --- what the unpickler may build ----------------------------------------------------------------

class _Marker(_Sealed):
    """Stands for a torch class or object the pickle names: ``torch.FloatStorage`` (kind
    'storage', the dtype it holds), ``torch.float32`` (kind 'dtype') or ``torch.Tensor`` (kind
    'tensor class')."""

    __slots__ = ("kind", "dtype")

    def __init__(self, kind: str, dtype: str = ""):
        self.kind, self.dtype = kind, dtype

    def __repr__(self) -> str:
        return f"the torch {self.kind} {self.dtype}".rstrip()


class _Admitted(_Sealed):
    """An admitted function: the pickle may call it, not change it."""

    __slots__ = ("function",)

    def __init__(self, function: Callable):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)

    def __repr__(self) -> str:
        return self.function.__name__


class InertObject:
    """Stands in for a training-state object (an argparse.Namespace, a config node, a numpy
    scalar): records what the pickle says about it and never runs anything.  Conversion does not
    use these; they only keep the rest of the checkpoint readable."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.elements = args, kwargs, None, {}, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


def _tensor(storage, storage_offset, size, stride, dtype: Optional[str] = None) -> TensorView:
    if not isinstance(storage, _TypedStorage):
        raise _Corrupt(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise _Corrupt(f"malformed tensor (size {size}, stride {stride}, offset {storage_offset})")
    return TensorView(storage.storage, dtype or storage.dtype, shape, strides, storage.offset + storage_offset)


def _int_tuple(values, what: str) -> tuple:
    values = tuple(values) if isinstance(values, (tuple, list)) else None
    if values is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _Corrupt(f"malformed tensor {what}")
    return values


def _no_lazy_bits(metadata) -> None:
    if metadata and any(metadata.values()):
        raise _Corrupt(f"tensor with lazy {', '.join(k for k, v in metadata.items() if v)} bit (not a stored tensor)")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    _no_lazy_bits(metadata)
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not (isinstance(dtype, _Marker) and dtype.kind == "dtype"):
        raise _Corrupt("malformed tensor dtype")
    _no_lazy_bits(metadata)
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorView):
        raise _Corrupt("a parameter wraps something other than a tensor")
    return data


_REBUILD_FUNCTIONS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type(func, new_type, args, state):
    """torch's wrapper for tensors that carry Python attributes: rebuild, drop the attributes."""
    if not (isinstance(func, _Admitted) and func.function in _REBUILD_FUNCTIONS
            and isinstance(new_type, _Marker) and new_type.kind == "tensor class" and isinstance(args, tuple)):
        raise _Corrupt("malformed tensor subclass record")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0/1 objects), for inert placeholders only."""
    if not (isinstance(cls, type) and issubclass(cls, InertObject) and base is object):
        raise _Corrupt("copyreg._reconstructor used on something other than a plain object")
    return cls.__new__(cls)


def _latin1_bytes(text, encoding="latin1"):
    """_codecs.encode as protocol-2 pickles use it: bytes written as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Corrupt("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


_TENSOR_CLASS = _Marker("tensor class")
ADMITTED_GLOBALS = {  # built-in types (immutable), _Admitted functions and the markers above
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _Admitted(_reconstructor),
    ("_codecs", "encode"): _Admitted(_latin1_bytes),
    ("torch", "Size"): tuple,
    ("torch", "Tensor"): _TENSOR_CLASS,
    ("torch._tensor", "Tensor"): _TENSOR_CLASS,
    ("torch.nn.parameter", "Parameter"): _TENSOR_CLASS,
    ("torch._utils", "_rebuild_tensor"): _Admitted(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Admitted(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Admitted(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Admitted(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Admitted(_rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _Admitted(_rebuild_from_type),
    ("torch._tensor", "_rebuild_from_type"): _Admitted(_rebuild_from_type),
    ("torch.tensor", "_rebuild_from_type_v2"): _Admitted(_rebuild_from_type),  # module name before torch 1.9
    ("torch.tensor", "_rebuild_from_type"): _Admitted(_rebuild_from_type),
    **{("torch", name): _Marker("storage", dtype) for name, dtype in STORAGE_CLASSES.items()},
    ("torch.storage", "UntypedStorage"): _Marker("storage", "uint8"),  # how _rebuild_tensor_v3 names it
    **{("torch", name): _Marker("dtype", name) for name in ELEMENT_TYPES},
    **{("torch", alias): _Marker("dtype", name) for alias, name in DTYPE_ALIASES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    """find_class is a table lookup (nothing is imported); persistent ids become storages."""

    def __init__(self, file, storage_for: Optional[Callable] = None):
        super().__init__(file)
        self._storage_for = storage_for
        self._inert_classes: dict = {}  # made per load: whatever a pickle does to them stays in it

    def find_class(self, module, name):
        module = PY2_MODULES.get(module, module)
        admitted = ADMITTED_GLOBALS.get((module, name))
        if admitted is not None:
            return admitted
        global_name = f"{module}.{name}"
        if global_name not in INERT_GLOBALS:
            raise _Refused(global_name)
        if global_name not in self._inert_classes:
            self._inert_classes[global_name] = type(f"Inert[{global_name}]", (InertObject,),
                                                    {"global_name": global_name})
        return self._inert_classes[global_name]

    def persistent_load(self, pid):
        if self._storage_for is None or not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise _Corrupt(f"unexpected persistent id {str(pid)[:60]}")
        return self._storage_for(pid[1:])


def _storage_fields(fields: tuple, expected: int) -> tuple:
    """(dtype, key, numel) of a persistent storage id, checked."""
    if len(fields) != expected or not (isinstance(fields[0], _Marker) and fields[0].kind == "storage"):
        raise _Corrupt("malformed storage reference")
    key, numel = fields[1], fields[3]
    key = key.decode("ascii") if isinstance(key, bytes) else key
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise _Corrupt("malformed storage reference")
    return fields[0].dtype, key, numel


def element_size(dtype: str) -> int:
    """Bytes per element of a torch dtype as stored."""
    return np.dtype(ELEMENT_TYPES[dtype]).itemsize


# --- the two file formats ----------------------------------------------------------------------

# Records smaller than this are read (one pread) rather than mapped: a mapping costs three system
# calls and, in a process with a second thread running, an interrupt of the other core to unmap.
SMALL_RECORD_BYTES = 64 * 1024


class _RecordFile:
    """The checkpoint file, open for reading records.  Each record is memory-mapped on its own
    when asked for (pages populated up front, far cheaper than faulting them in one by one) and
    unmapped when the last array viewing it is gone, so reading a checkpoint keeps only the
    tensors in use resident; small records are simply read."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, nbytes: int) -> bytes:
        data = os.pread(self.fd, nbytes, offset)
        if len(data) != nbytes:
            raise _Corrupt("the file ends early (truncated?)")
        return data

    def bytes_at(self, offset: int, nbytes: int) -> np.ndarray:
        if offset + nbytes > self.size:
            raise _Corrupt("a storage runs past the end of the file (truncated?)")
        if nbytes == 0:
            return np.empty(0, np.uint8)
        if nbytes < SMALL_RECORD_BYTES:
            return np.frombuffer(self.read(offset, nbytes), np.uint8)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(self.fd, offset + nbytes - start, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                           prot=mmap.PROT_READ, offset=start)
        return np.frombuffer(mapped, np.uint8, count=nbytes, offset=offset - start)


class _ZipCheckpoint:
    """``<archive>/data.pkl`` plus ``<archive>/data/<key>`` records; stored records are mapped
    (their CRC-32 checked on first use), compressed ones (a re-zipped file) are inflated."""

    def __init__(self, path: Path):
        self.path = path
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if not infos:
                raise _Corrupt("an empty zip archive, not a PyTorch checkpoint")
            self.prefix = infos[0].filename.split("/", 1)[0] + "/"
            self.records = {i.filename[len(self.prefix):]: i for i in infos if i.filename.startswith(self.prefix)}
            if "data.pkl" not in self.records:
                kind = ("a TorchScript archive (torch.jit.save)" if "constants.pkl" in self.records
                        else "a zip archive without data.pkl")
                raise _Corrupt(f"{kind}, not a PyTorch checkpoint")
            self.pickle = archive.read(self.records["data.pkl"])
            # Files from torch < 1.10 have no byteorder record: they are little-endian.
            recorded = archive.read(self.records["byteorder"]).strip() if "byteorder" in self.records else b""
            self.byteorder = ">" if recorded == b"big" else "<"
        self.file = _RecordFile(path)
        self._storages: dict = {}  # key -> Storage: every reference to a record shares one
        self._locations: dict = {}  # record name -> (fd, offset, length), once its header is read

    def load(self):
        return _SafeUnpickler(io.BytesIO(self.pickle), self._storage).load()

    def _storage(self, fields: tuple) -> _TypedStorage:
        dtype, key, numel = _storage_fields(fields, 4)
        name = f"data/{key}"
        if name not in self.records:
            raise _Corrupt(f"the pickle references storage {name}, which the archive does not hold")
        if key not in self._storages:
            self._storages[key] = Storage(self.path, name, numel * element_size(dtype), lambda: self._record(name),
                                          self.byteorder, verify=self._crc_check(name),
                                          locate=lambda: self._location(name))
        return _TypedStorage(self._storages[key], dtype)

    def _record(self, name: str) -> np.ndarray:
        info = self.records[name]
        if info.compress_type != zipfile.ZIP_STORED:
            with zipfile.ZipFile(self.path) as archive:  # zipfile checks the CRC
                return np.frombuffer(archive.read(info), np.uint8)
        _, offset, nbytes = self._location(name)
        return self.file.bytes_at(offset, nbytes)

    def _crc_check(self, name: str) -> Optional[Callable[[np.ndarray], None]]:
        """The CRC-32 check of a stored record.  None for a compressed one (zipfile checks those
        as it inflates them) and for CRC 0, which torch writes when told not to compute CRCs."""
        info = self.records[name]
        if info.compress_type != zipfile.ZIP_STORED or not info.CRC:
            return None

        def check(chunks) -> None:
            crc = 0
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)
            if crc != info.CRC:
                raise _Corrupt(f"{name} fails its CRC-32 check (corrupted checkpoint)")
        return check

    def _location(self, name: str) -> tuple:
        """(file descriptor, offset, length) of a stored record's bytes, its local header read once."""
        if name not in self._locations:
            info = self.records[name]
            if info.compress_type != zipfile.ZIP_STORED:
                raise _Corrupt(f"{name} is compressed")
            offset = self._data_offset(info)
            if offset + info.file_size > self.file.size:
                raise _Corrupt("a storage runs past the end of the file (truncated?)")
            self._locations[name] = (self.file.fd, offset, info.file_size)
        return self._locations[name]

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored record's bytes start: after its local header (whose name and extra
        field, torch's alignment padding, may differ in length from the central directory's)."""
        header = self.file.read(info.header_offset, 30)
        if header[:4] != b"PK\x03\x04":
            raise _Corrupt(f"zip record {info.filename} has no valid local header")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_length + extra_length


class _LegacyCheckpoint:
    """Five pickles, then each storage (in the order of the storage-key list) as an int64
    element count and its bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.file = _RecordFile(path)
        self.declared: dict = {}  # key -> (dtype, numel) from the pickle
        self.storages: dict = {}  # key -> Storage: every reference to a record shares one
        self.offsets: dict = {}  # key -> byte offset of the storage's data
        self.byteorder = "<"

    def load(self):
        # The unpickler reads a real file only up to each pickle's STOP, so tell() then points
        # at the next pickle and, after the last one, at the storages.
        with open(self.path, "rb") as stream:
            if _SafeUnpickler(stream).load() != LEGACY_MAGIC_NUMBER:
                raise _Corrupt("a pickle, but not a PyTorch checkpoint (no torch magic number)")
            if _SafeUnpickler(stream).load() != LEGACY_PROTOCOL_VERSION:
                raise _Corrupt("unsupported legacy torch format version")
            info = _SafeUnpickler(stream).load()
            if isinstance(info, dict) and info.get("little_endian") is False:
                self.byteorder = ">"
            tree = _SafeUnpickler(stream, self._storage).load()
            keys = _SafeUnpickler(stream).load()
            self._locate(keys, stream.tell())
        return tree

    def _storage(self, fields: tuple) -> _TypedStorage:
        dtype, key, numel = _storage_fields(fields, 5)
        view = fields[4]
        if key not in self.declared:
            self.declared[key] = (dtype, numel)
            self.storages[key] = Storage(self.path, f"storage {key}", numel * element_size(dtype),
                                         lambda: self._record(key), self.byteorder, locate=lambda: self._location(key))
        root_dtype = self.declared[key][0]
        storage = self.storages[key]
        if view is None:
            return _TypedStorage(storage, root_dtype)
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[1], int)):
            raise _Corrupt("malformed storage view")
        return _TypedStorage(storage, root_dtype, view[1])

    def _locate(self, keys, offset: int) -> None:
        if not isinstance(keys, list) or set(keys) != set(self.declared):
            raise _Corrupt("the storage list does not match the storages the pickle uses")
        for key in keys:
            (numel,) = struct.unpack("<q", self.file.read(offset, 8))
            dtype, declared = self.declared[key]
            if numel != declared:
                raise _Corrupt(f"storage {key} holds {numel} elements, the pickle expects {declared}")
            self.offsets[key] = offset + 8
            offset += 8 + numel * element_size(dtype)
        if offset > self.file.size:
            raise _Corrupt("the file ends inside its storages (truncated?)")

    def _location(self, key: str) -> tuple:
        return self.file.fd, self.offsets[key], self.storages[key].nbytes

    def _record(self, key: str) -> np.ndarray:
        return self.file.bytes_at(self.offsets[key], self.storages[key].nbytes)


# --- entry point ---------------------------------------------------------------------------------

def load(path):
    """The object saved in a torch checkpoint file, every tensor a TensorView (nothing read yet).

    Raises RefusedGlobal for a pickle that asks for anything beyond tensors, containers and the
    inert training state, TorchFileError for anything else that is not a readable checkpoint."""
    path = Path(path)
    kind = checkpoint_kind(path)
    try:
        reader = _ZipCheckpoint(path) if kind == "zip" else _LegacyCheckpoint(path)
        return reader.load()
    except _Refused as exc:
        raise RefusedGlobal(path, str(exc)) from None
    except _Corrupt as exc:
        raise TorchFileError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, RecursionError, zipfile.BadZipFile, zlib.error, struct.error, OSError) as exc:
        raise TorchFileError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupted? "
                             f"({first_sentence(exc)})") from None


def checkpoint_kind(path: Path) -> str:
    """'zip' or 'legacy' from the first bytes, or a TorchFileError saying what the file is not."""
    with open(path, "rb") as f:
        head = f.read(4)
        is_zip = zipfile.is_zipfile(f)
    if not head:
        raise TorchFileError(f"{path}: empty file, not a checkpoint")
    if is_zip:
        return "zip"
    if head.startswith(b"PK\x03\x04"):
        raise TorchFileError(f"{path}: a zip archive without its central directory, truncated or corrupted?")
    if head[:1] == b"\x80":  # PROTO opcode: every protocol >= 2 pickle starts with it
        return "legacy"
    raise TorchFileError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
