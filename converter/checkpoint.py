"""Reading checkpoints: file -> container -> official torch state dict (as numpy arrays).

Supported files: .pth, .pth.tar, .pt, .bin (torch zip or legacy format) and .safetensors.
Torch files are read weights-only (no code in the pickle is ever executed) unless the caller
opts in to legacy pickles.  Containers: a raw state dict, or a dict holding one under
``model`` / ``state_dict`` / ``state_dict_ema`` / ``model_ema`` (or any ``key=``).
DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes are stripped.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".tar", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Entries that hold a state dict in checkpoints written by the official repos and timm;
# tried after a family's own entries, so a file saved by another trainer still loads.
GENERIC_ENTRIES = ("state_dict", "model", "module")
EMA_ENTRIES = ("state_dict_ema", "model_ema")
PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(UserError):
    pass


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict  # key -> np.ndarray, official key names
    entry: str  # which container entry was used ('<raw>' for a bare state dict)
    stripped_prefixes: list = field(default_factory=list)
    upcast: dict = field(default_factory=dict)  # original dtype -> number of tensors cast to float32
    other_entries: list = field(default_factory=list)  # state dicts present but not used

    def describe(self) -> str:
        text = f"entry '{self.entry}'"
        if self.stripped_prefixes:
            text += f", stripped prefix {', '.join(repr(p) for p in self.stripped_prefixes)}"
        if self.upcast:
            text += ", cast to float32: " + ", ".join(f"{n} {d}" for d, n in self.upcast.items())
        if self.other_entries:
            text += f" (also present: {', '.join(self.other_entries)})"
        return text


def _is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_torch_file(path: Path, unsafe_pickle: bool):
    import torch

    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and not _starts_like_pickle(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    if unsafe_pickle:
        warnings.warn(f"{path}: loading with full pickle (--unsafe-pickle); this runs any code the file "
                      f"contains. Only do this for files you trust.", stacklevel=2)
    try:
        # mmap keeps the tensors on disk until used: no second full copy in memory.
        return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            glob = _refused_global(str(exc))
            raise CheckpointError(
                f"{path}: the file's pickle needs {glob or 'code beyond tensors and containers'}; refused "
                f"by safe loading. If you trust the file, pass --unsafe-pickle") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a "
                              f"pickle of tensors)") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError,
            IndexError, TypeError, ModuleNotFoundError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupted? "
                              f"({_first_sentence(exc)})") from None


def _starts_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # pickle PROTO opcode, first byte of every protocol >= 2 pickle


def _first_sentence(exc: BaseException, limit: int = 100) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refused_global(message: str) -> Optional[str]:
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in message:
            rest = message.split(marker, 1)[1]
            return "global " + rest.split()[0].rstrip(".,")
    return None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_sentence(exc)})") from None


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


def _to_numpy(state_dict: dict, keep_dtype: bool) -> tuple:
    import torch

    out, upcast = {}, {}
    for k, t in state_dict.items():
        t = t.detach()
        if t.is_floating_point() and t.dtype != torch.float32 and not keep_dtype:
            upcast[str(t.dtype).replace("torch.", "")] = upcast.get(str(t.dtype).replace("torch.", ""), 0) + 1
            t = t.float()
        if t.dtype == torch.bfloat16:
            raise CheckpointError("bfloat16 tensors cannot be kept as bfloat16 in .pdparams (numpy has no "
                                  "bfloat16); drop --keep-dtype to convert them to float32")
        out[k] = t.cpu().numpy()
    return out, upcast


def read_checkpoint(path, family_entries: tuple = (), *, ema: bool = False, key: Optional[str] = None,
                    unsafe_pickle: bool = False, keep_dtype: bool = False) -> Checkpoint:
    """Read a checkpoint file into the official state dict (numpy arrays, float32 by default)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.name.endswith(SAFETENSORS_SUFFIX):
        if key or ema:
            raise CheckpointError(f"{path}: a safetensors file holds one state dict; --key/--ema do not apply")
        obj, entry, others = _load_safetensors(path), "<safetensors>", []
        state_dict = obj
    else:
        obj = _load_torch_file(path, unsafe_pickle)
        entry, state_dict, others = _pick_entry(obj, family_entries, ema, key, path)
    state_dict, stripped = _strip_prefixes(dict(state_dict))
    arrays, upcast = _to_numpy(state_dict, keep_dtype)
    return Checkpoint(path, arrays, entry, stripped, upcast, others)


def torch_state_dict(ckpt: Checkpoint) -> dict:
    """The checkpoint as torch tensors (for loading the torch reference)."""
    import torch

    return {k: torch.from_numpy(np.asarray(v)) for k, v in ckpt.state_dict.items()}


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
