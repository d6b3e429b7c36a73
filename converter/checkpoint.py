"""Reading checkpoints: file -> container -> official state dict (lazy numpy arrays).

Supported files: .pth, .pth.tar, .pt, .bin (torch zip or legacy format), read by
``converter.torch_reader`` (standard library and numpy only; nothing in the file is ever run),
and .safetensors through the safetensors package's numpy interface.  Neither needs PyTorch.
``unsafe_pickle`` is a separate, explicit fallback to ``torch.load`` with full pickle, for
trusted files that pickle whole models or custom classes: it runs the file's code and needs
torch; the reader itself has no such mode.

Containers: a raw state dict, or a dict holding one under ``model`` / ``state_dict`` /
``state_dict_ema`` / ``model_ema`` (or any ``key=``).  DDP (``module.``) and torch.compile
(``_orig_mod.``) prefixes are stripped.  Values are LazyArrays: each tensor is read from the
(memory-mapped) file when used, so no second copy of the checkpoint is ever held.
"""
from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError, first_sentence
from .extras import require_torch
from .lazy import LazyArray
from .torch_reader import (ELEMENT_TYPES, RefusedGlobal, Storage, TensorView, bfloat16_to_float32,
                           contiguous_strides, element_size, load, widen_to_float32)

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".tar", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Entries that hold a state dict in checkpoints written by the official repos and timm;
# tried after a family's own entries, so a file saved by another trainer still loads.
GENERIC_ENTRIES = ("state_dict", "model", "module")
EMA_ENTRIES = ("state_dict_ema", "model_ema")
PREFIXES = ("module.", "_orig_mod.")
# Floating types converted to float32 unless keep_dtype (what torch's .float() does).
CAST_TO_FLOAT32 = {"float16": widen_to_float32, "float64": widen_to_float32, "bfloat16": bfloat16_to_float32}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class CheckpointError(UserError):
    pass


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict  # key -> LazyArray (np.asarray reads it), official key names
    entry: str  # which container entry was used ('<raw>' for a bare state dict)
    stripped_prefixes: list = field(default_factory=list)
    upcast: dict = field(default_factory=dict)  # original dtype -> number of tensors cast to float32
    other_entries: list = field(default_factory=list)  # state dicts present but not used
    backbone_prefix: str = ""  # a detector/segmentor file: the prefix its backbone keys carried
    left_out: dict = field(default_factory=dict)  # ... and what else it held: group -> number of keys

    def describe(self) -> str:
        text = f"entry '{self.entry}'"
        if self.backbone_prefix:
            text += f", backbone keys under '{self.backbone_prefix}'"
        if self.stripped_prefixes:
            text += f", stripped prefix {', '.join(repr(p) for p in self.stripped_prefixes)}"
        if self.upcast:
            text += ", cast to float32: " + ", ".join(f"{n} {d}" for d, n in self.upcast.items())
        if self.other_entries:
            text += f" (also present: {', '.join(self.other_entries)})"
        return text


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, TensorView) for k, v in obj.items())


def _load_torch_file(path: Path, unsafe_pickle: bool):
    if unsafe_pickle:
        return _load_with_torch_pickle(path)
    try:
        return load(path)
    except RefusedGlobal as exc:
        raise CheckpointError(f"{exc}. If you trust the file, --unsafe-pickle loads it with torch.load, "
                              f"which runs its code (needs torch)") from None


def _load_with_torch_pickle(path: Path):
    """``--unsafe-pickle``: torch.load with full pickle -- the file's code runs.  Kept apart from
    the reader so that nothing else can reach it."""
    torch = require_torch("--unsafe-pickle (torch.load)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    warnings.warn(f"{path}: loading with full pickle (--unsafe-pickle); this runs any code the file "
                  f"contains. Only do this for files you trust.", stacklevel=3)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # the file's own code ran: any exception type can come out
        raise CheckpointError(f"{path}: torch.load failed ({first_sentence(exc)})") from None
    return _as_views(obj, torch, path)


def _as_views(obj, torch, path: Path):
    """A torch.load result with modules replaced by their state dicts and tensors by TensorViews
    of their storages, so the rest of the pipeline is the reader's."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        raw = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy()
        storage = Storage(path, "a storage", raw.size, lambda: raw, "=")
        return TensorView(storage, str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape),
                          tuple(tensor.stride()), tensor.storage_offset())
    if isinstance(obj, dict):
        return {k: _as_views(v, torch, path) for k, v in obj.items()}
    return obj


def _load_safetensors(path: Path) -> dict:
    """Every tensor of a .safetensors file as a TensorView, read through the package's numpy
    interface when used.  numpy has no bfloat16, so those tensors are read as raw bits at the
    offsets the (already validated) header gives."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
        slices = {k: handle.get_slice(k) for k in handle.keys()}
        specs = {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_sentence(exc)})") from None
    unknown = sorted({dtype for dtype, _ in specs.values()} - set(SAFETENSORS_DTYPES))
    if unknown:
        raise CheckpointError(f"{path}: unsupported safetensors dtype {', '.join(unknown)}")
    bf16_offsets = _safetensors_offsets(path) if any(d == "BF16" for d, _ in specs.values()) else {}

    def reader(key: str):
        if key in bf16_offsets:
            start, end = bf16_offsets[key]
            return lambda: np.fromfile(path, np.uint8, count=end - start, offset=start)
        return lambda: handle.get_tensor(key).reshape(-1).view(np.uint8)

    views = {}
    for key, (dtype, shape) in specs.items():
        dtype = SAFETENSORS_DTYPES[dtype]
        nbytes = math.prod(shape) * element_size(dtype)
        views[key] = TensorView(Storage(path, key, nbytes, reader(key)), dtype, shape, contiguous_strides(shape), 0)
    return views


def _safetensors_offsets(path: Path) -> dict:
    """key -> (start, end) byte range in the file, from the header: 8-byte length, then JSON."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {k: (8 + length + v["data_offsets"][0], 8 + length + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _pick_entry(obj, family_entries: tuple, ema: bool, key: Optional[str], path: Path):
    """Return (entry name, state dict, other state-dict entries)."""
    if _is_tensor_dict(obj):
        if key or ema:
            raise CheckpointError(f"{path}: the file is a bare state dict; it has no entry "
                                  f"'{key or 'EMA'}' to select")
        return "<raw>", obj, []
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or a dict of them")
    candidates = [k for k, v in obj.items() if _is_tensor_dict(v)]
    if key is not None:
        if key not in candidates:
            raise CheckpointError(f"{path}: no state dict under '{key}'; entries holding one: "
                                  f"{', '.join(candidates) or 'none'}")
        order = (key,)
    elif ema:
        order = EMA_ENTRIES
    else:
        order = tuple(family_entries) + GENERIC_ENTRIES + EMA_ENTRIES
    for name in order:
        if name in candidates:
            return name, obj[name], [c for c in candidates if c != name]
    if ema:
        raise CheckpointError(f"{path}: no EMA weights ({' / '.join(EMA_ENTRIES)}); entries holding a "
                              f"state dict: {', '.join(candidates) or 'none'}")
    raise CheckpointError(f"{path}: no state dict found; top-level entries: {', '.join(map(str, obj)) or 'none'}")


def _strip_prefixes(state_dict: dict) -> tuple:
    stripped = []
    for prefix in PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
            stripped.append(prefix)
    return state_dict, stripped


def take_backbone(state_dict: dict, prefix: str) -> tuple:
    """A detector/segmentor state dict -> (its backbone's keys with ``prefix`` removed, the
    prefix, the rest counted by group).  A group is the key up to the first component off the prefix's path:
    ``neck``, ``roi_heads`` -- or ``backbone.fpn_lateral2`` beside ``backbone.bottom_up.model.``.
    A state dict with no key under ``prefix`` (a classification checkpoint, a bare backbone) is
    returned as it is, with prefix "" and nothing left out."""
    if not prefix or not any(k.startswith(prefix) for k in state_dict):
        return state_dict, "", {}
    path = prefix.rstrip(".").split(".")
    inside, left_out = {}, {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            inside[key[len(prefix):]] = value
            continue
        parts = key.split(".")
        depth = next((i for i, (a, b) in enumerate(zip(parts, path)) if a != b), min(len(parts), len(path)))
        group = ".".join(parts[:depth + 1])
        left_out[group] = left_out.get(group, 0) + 1
    return inside, prefix, left_out


def _as_arrays(tensors: dict, keep_dtype: bool) -> tuple:
    """TensorViews -> LazyArrays, floating types other than float32 cast to float32 unless
    ``keep_dtype``.  Returns (arrays, {original dtype: number of tensors cast})."""
    arrays, cast = {}, {}
    for key, view in tensors.items():
        array = LazyArray(view.numpy, view.shape, ELEMENT_TYPES[view.dtype], file_span=view.file_span)
        if view.dtype in CAST_TO_FLOAT32 and not keep_dtype:
            cast[view.dtype] = cast.get(view.dtype, 0) + 1
            array = array.then(CAST_TO_FLOAT32[view.dtype], dtype=np.float32)
        elif view.dtype == "bfloat16":
            raise CheckpointError("bfloat16 tensors cannot be kept as bfloat16 in .pdparams (numpy has no "
                                  "bfloat16); drop --keep-dtype to convert them to float32")
        arrays[key] = array
    return arrays, cast


def read_checkpoint(path, family_entries: tuple = (), *, ema: bool = False, key: Optional[str] = None,
                    unsafe_pickle: bool = False, keep_dtype: bool = False, backbone_prefix: str = "") -> Checkpoint:
    """Read a checkpoint file into the official state dict (LazyArrays, float32 by default).
    With ``backbone_prefix``, a detector/segmentor file yields its backbone (``take_backbone``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.name.endswith(SAFETENSORS_SUFFIX):
        if key or ema:
            raise CheckpointError(f"{path}: a safetensors file holds one state dict; --key/--ema do not apply")
        state_dict, entry, others = _load_safetensors(path), "<safetensors>", []
    else:
        obj = _load_torch_file(path, unsafe_pickle)
        entry, state_dict, others = _pick_entry(obj, family_entries, ema, key, path)
    state_dict, stripped = _strip_prefixes(dict(state_dict))
    state_dict, backbone_prefix, left_out = take_backbone(state_dict, backbone_prefix)
    arrays, upcast = _as_arrays(state_dict, keep_dtype)
    return Checkpoint(path, arrays, entry, stripped, upcast, others, backbone_prefix, left_out)


def torch_state_dict(ckpt: Checkpoint) -> dict:
    """The checkpoint as torch tensors (for loading the torch reference)."""
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in ckpt.state_dict.items()}  # copies: writable


def check_output_path(dst, force: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and not force:
        raise UserError(f"{dst}: already exists; pass --force to overwrite")
    if dst.is_dir():
        raise UserError(f"{dst}: is a directory")
    if not dst.parent.exists():
        raise UserError(f"{dst.parent}: output directory does not exist")
    return dst


def atomic_write(dst: Path, write) -> None:
    """Call ``write(tmp_path)`` and move the result into place; on any failure or Ctrl-C the
    temporary file is removed and ``dst`` is untouched."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
