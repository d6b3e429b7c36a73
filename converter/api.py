"""The Python API: convert checkpoints and create either framework's model by name.

    converter.convert(name, src, dst, **options)
    converter.create_paddle_model(name, params=None)
    converter.create_torch_model(name, checkpoint=None)
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .checkpoint import Checkpoint, atomic_write, check_output_path, read_checkpoint, torch_state_dict
from .engine import (ConversionReport, MappingError, convert_state_dict, reverse_state_dict, shapes_fit,
                     target_key)
from mappings.rules import Init

from .errors import UserError, first_sentence, one_line
from .layouts import paddle_layout, paddle_skeleton
from .lazy import materialize
from .pdparams import write_pdparams
from .registry import MODELS, ModelSpec, get_spec


@dataclass
class ConvertResult:
    model: str
    checkpoint: Checkpoint
    report: ConversionReport
    state_dict: dict  # numpy arrays; LazyArrays (np.asarray reads them) when written to ``output``
    seconds: float
    output: Optional[Path] = None
    from_classifier: bool = False  # a dense backbone started from an ImageNet classification checkpoint

    def summary(self) -> str:
        r = self.report
        dropped = ", ".join(f"{n} {why.split(';')[0]}" for why, n in r.dropped.items()) or "none"
        lines = [
            f"model        {self.model}",
            f"source       {self.checkpoint.path} ({self.checkpoint.describe()})"
            + ("\n             an ImageNet classification checkpoint, converted into the dense backbone"
               if self.from_classifier else ""),
            f"keys         {r.converted} converted: {r.transposed} transposed (Linear), {r.renamed} renamed; "
            f"{r.num_dropped} dropped ({dropped})",
            f"values       {r.num_parameters:,} (parameters and BatchNorm statistics)",
        ]
        if self.checkpoint.left_out:
            lines.append("left out     " + ", ".join(f"{g}: {n} keys" for g, n in self.checkpoint.left_out.items())
                         + " (not the backbone)")
        if r.initialised:
            lines.append("initialised  " + "; ".join(f"{n} {why}" for why, n in r.initialised.items())
                         + ": the dense backbone's own, absent from the classification checkpoint")
        if r.allowed_missing:
            lines.append(f"left unset   {len(r.allowed_missing)} (allowed): {', '.join(r.allowed_missing[:4])}"
                         + (" ..." if len(r.allowed_missing) > 4 else ""))
        if self.output:
            lines.append(f"written      {self.output}")
        lines.append(f"time         {self.seconds:.2f} s")
        return "\n".join(lines)


# Names and shapes of the Paddle model's state dict (recorded, or read off a weightless skeleton
# for a non-default configuration; see converter.layouts).
paddle_target_shapes = paddle_layout


def read_model_checkpoint(spec: ModelSpec, path, **options) -> Checkpoint:
    """``path`` read as ``spec``'s official loader reads it: its container entries, and for a dense
    backbone the backbone keys of a detector/segmentor file."""
    return read_checkpoint(path, spec.checkpoint_entries,
                           backbone_prefix=spec.dense.checkpoint_prefix if spec.dense else "", **options)


def from_classifier(spec: ModelSpec, ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` is an ImageNet classification checkpoint to start ``spec``'s dense backbone
    from: not a detector file, and holding a classification head."""
    return bool(spec.dense) and not ckpt.backbone_prefix and any(k.startswith("head.") for k in ckpt.state_dict)


def conversion_rules(spec: ModelSpec, ckpt: Checkpoint) -> tuple:
    """The mapping table for this checkpoint: the model's own, plus -- for a dense backbone started
    from a classification checkpoint -- the family's FROM_CLASSIFIER rules (head and final norm
    dropped, the extra output norms initialised)."""
    if from_classifier(spec, ckpt):
        return tuple(spec.rules) + tuple(spec.from_classifier_rules)
    return tuple(spec.rules)


def _check_has_backbone(spec: ModelSpec, ckpt: Checkpoint, rules: tuple, shapes: dict) -> None:
    """A dense backbone's checkpoint with not one of its keys: one clear line, not 300 missing keys."""
    if not spec.dense or any(target_key(k, rules) in shapes for k in ckpt.state_dict):
        return
    groups: dict = {}
    for k in ckpt.state_dict:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    found = ", ".join(f"{g} ({n})" for g, n in list(groups.items())[:6])
    guess = closest_model(ckpt.state_dict)
    hint = f" -- the checkpoint fits {guess}" if guess else ""
    raise UserError(f"{ckpt.path}: no backbone keys for {spec.name}: none under "
                    f"'{spec.dense.checkpoint_prefix}' and none of its own (found: {found}){hint}")


def convert_checkpoint(spec: ModelSpec, ckpt: Checkpoint, *, allow_missing: Iterable[str] = (),
                       num_classes: int = 1000, img_size: Optional[int] = None, lazy: bool = False) -> tuple:
    """The in-memory conversion: official state dict -> Paddle state dict (numpy arrays; with
    ``lazy``, LazyArrays that read the checkpoint when used, for writing one tensor at a time)."""
    shapes = paddle_target_shapes(spec, num_classes, img_size)
    rules = conversion_rules(spec, ckpt)
    _check_has_backbone(spec, ckpt, rules, shapes)
    try:
        state_dict, report = convert_state_dict(ckpt.state_dict, rules, shapes, allow_missing,
                                                computed=getattr(spec, "computed_values", None))
        return (state_dict if lazy else materialize(state_dict)), report
    except MappingError as exc:
        if exc.count > len(shapes) // 10:  # not a few stray keys: maybe another model's checkpoint
            guess = closest_model(ckpt.state_dict)
            if guess and guess != spec.name:
                exc.args = (f"{exc.args[0]} -- the checkpoint fits {guess}, not {spec.name}",)
        raise


def closest_model(state_dict: dict) -> Optional[str]:
    """The registered model whose keys and shapes ``state_dict`` fits exactly, if any."""
    source = {k: np.shape(v) for k, v in state_dict.items()}
    for spec in MODELS.values():
        if not isinstance(spec, ModelSpec):
            continue  # pair files and plug-ins: building their models to compare would cost seconds each
        try:
            if shapes_fit(source, spec.rules, paddle_target_shapes(spec)):
                return spec.name
        except ImportError:
            continue
    return None


def save_pdparams(state_dict: dict, dst: Path) -> None:
    """A .pdparams file is a pickled dict of numpy arrays (what ``paddle.load`` reads); values
    may be LazyArrays, which are read and written one at a time (converter.pdparams)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write_pdparams(state_dict, f)
    atomic_write(dst, write)


def convert(name: str, src, dst, *, force: bool = False, ema: bool = False, key: Optional[str] = None,
            unsafe_pickle: bool = False, keep_dtype: bool = False, allow_missing: Iterable[str] = (),
            num_classes: int = 1000, img_size: Optional[int] = None) -> ConvertResult:
    """Convert an official PyTorch checkpoint ``src`` into a Paddle ``.pdparams`` at ``dst``."""
    start = time.perf_counter()
    spec = get_spec(name)
    dst = check_output_path(dst, force) if dst is not None else None
    with cyclic_gc_paused():
        ckpt = read_model_checkpoint(spec, src, ema=ema, key=key, unsafe_pickle=unsafe_pickle,
                                     keep_dtype=keep_dtype)
        state_dict, report = convert_checkpoint(spec, ckpt, allow_missing=allow_missing, num_classes=num_classes,
                                                img_size=img_size, lazy=dst is not None)
        if dst is not None:
            save_pdparams(state_dict, dst)
    return ConvertResult(spec.name, ckpt, report, state_dict, time.perf_counter() - start, dst,
                         from_classifier(spec, ckpt))


@contextlib.contextmanager
def cyclic_gc_paused():
    """Pause Python's cycle collector for the block.  A conversion allocates tens of thousands
    of small objects, none in cycles, and that many allocations set off a full collection,
    which in a process that has imported torch and Paddle walks their whole heap: 0.1 s, as
    long as the rest of converting fcvit_b48.  Anything cyclic is collected after the block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class ReverseResult:
    model: str
    source: Path
    entry: str  # the container entry the checkpoint is written under
    report: ConversionReport
    recreated: list  # torch keys the table drops, written as a fresh torch reference holds them
    state_dict: dict  # torch tensors, official key order
    seconds: float
    output: Optional[Path] = None

    def summary(self) -> str:
        r = self.report
        lines = [
            f"model        {self.model}",
            f"source       {self.source} (Paddle weights)",
            f"keys         {r.converted} converted back: {r.transposed} transposed (Linear), {r.renamed} renamed",
            f"recreated    {len(self.recreated)} key(s) the Paddle weights do not hold, as a fresh reference "
            f"has them" + (f" (e.g. {self.recreated[0]})" if self.recreated else ""),
            f"values       {r.num_parameters:,} (parameters and BatchNorm statistics)",
        ]
        if self.output:
            lines.append(f"written      {self.output} (entry '{self.entry}')")
        lines.append(f"time         {self.seconds:.2f} s")
        return "\n".join(lines)


def convert_reverse(name: str, src, dst, *, force: bool = False, num_classes: int = 1000,
                    img_size: Optional[int] = None) -> ReverseResult:
    """Paddle weights ``src`` (.pdparams) -> an official-format PyTorch checkpoint ``dst``, by the
    same mapping table read backwards, saved under the family's official entry.

    Every tensor the Paddle weights hold comes back bit for bit.  Keys the table drops and the
    torch reference has (BatchNorm ``num_batches_tracked``: Paddle keeps no step counter, so the
    original count is lost) are written as a freshly built reference holds them (0), which
    eval never reads; the result loads strictly into the reference."""
    from .extras import require_torch

    start = time.perf_counter()
    spec = get_spec(name)
    if dst is not None:
        dst = check_output_path(dst, force)
        if dst.name.endswith(".safetensors"):
            raise UserError(f"{dst}: --reverse writes an official PyTorch checkpoint (torch.save); "
                            f"use a .pth path")
    torch = require_torch("torch2paddle convert --reverse")
    params = load_pdparams(src)
    reference = spec.create_torch(num_classes=num_classes, img_size=img_size).state_dict()
    arrays, recreated, report = reverse_state_dict(params, spec.rules,
                                                   {k: tuple(v.shape) for k, v in reference.items()})
    state = {k: torch.from_numpy(np.asarray(arrays[k])) if k in arrays else reference[k] for k in reference}
    entry = spec.checkpoint_entries[0]
    if spec.dense:  # laid out as its detector/segmentor file holds it, which the official loaders read
        state = {spec.dense.checkpoint_prefix + k: v for k, v in state.items()}
    if dst is not None:
        atomic_write(dst, lambda tmp: torch.save({entry: state}, tmp))
    return ReverseResult(spec.name, Path(src), entry, report, recreated, state, time.perf_counter() - start, dst)


def load_pdparams(path) -> dict:
    import paddle

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        params = paddle.load(str(path), return_numpy=True)
    except Exception as exc:  # paddle raises assorted types for non-pdparams input
        raise UserError(f"{path}: not a readable .pdparams file ({first_sentence(exc)})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: holds a {type(params).__name__}, not a Paddle state dict")
    params.pop("StructuredToParameterName@@", None)
    return params


def load_into_paddle(model, params: dict, source: str = "params") -> None:
    """Strict load: every key present, none extra, shapes equal (Paddle itself only warns)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected]
    mismatched = [f"{k} {tuple(np.shape(params[k]))} vs {expected[k]}" for k in expected
                  if k in params and tuple(np.shape(params[k])) != expected[k]]
    problems = [f"{len(v)} {label} (e.g. {v[0]})" for label, v in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if v]
    if problems:
        raise UserError(f"{source} do not fit the Paddle model: {'; '.join(problems)}")
    model.set_state_dict(materialize(params))


def create_paddle_model(name: str, params=None, *, num_classes: int = 1000, img_size: Optional[int] = None,
                        **model_kwargs):
    """An eval-mode Paddle model; ``params`` is a .pdparams path or a state dict.  ``model_kwargs``
    go to the model's factory (``drop_path_rate``, ``drop_rate``, ``out_indices``, ...).

    Fine-tuning on another class count: with ``num_classes`` other than the weights' head, every
    weight loads strictly except the classification head (``head.*``), which keeps the fresh
    initialisation the official code gives it."""
    spec = get_spec(name)
    model = spec.create_paddle(num_classes=num_classes, img_size=img_size, **model_kwargs)
    if params is not None:
        state = load_pdparams(params) if isinstance(params, (str, Path)) else params
        state = without_other_head(state, model.state_dict())
        load_into_paddle(model, state, str(params) if isinstance(params, (str, Path)) else "params")
    model.eval()
    from paddle_models.native import native_kernels_available

    native_kernels_available()  # the compiled kernels built or loaded now: no timed forward pays for a first build
    return model


def without_other_head(state: dict, own: dict) -> dict:
    """``state`` less its classification head when that head is for another class count; the
    model's own fresh head tensors take its place."""
    head = [k for k in state if k.startswith("head.")]
    if not head or all(k in own and tuple(np.shape(state[k])) == tuple(own[k].shape) for k in head):
        return state
    kept = {k: v for k, v in state.items() if not k.startswith("head.")}
    kept.update({k: own[k].numpy() for k in own if k.startswith("head.")})
    return kept


def reference_state_dict(spec: ModelSpec, ckpt: Checkpoint, model) -> dict:
    """The checkpoint as the torch reference loads it: only keys the mapping drops *and* the
    reference does not have (e.g. legacy buffers) are left out; anything else stays, so a
    strict load is a real test of the checkpoint."""
    own = set(model.state_dict())
    rules = conversion_rules(spec, ckpt)
    return {k: v for k, v in torch_state_dict(ckpt).items()
            if k in own or target_key(k, rules) is not None}


def _load_reference(spec: ModelSpec, ckpt: Checkpoint, model) -> None:
    """Strict, except that a dense backbone started from a classification checkpoint keeps the
    extra norms the classifier lacks at their fresh init (as the official code's non-strict load
    does) -- exactly the keys the Init rules fill on the Paddle side, none other."""
    state = reference_state_dict(spec, ckpt, model)
    if from_classifier(spec, ckpt):
        inits = [r for r in spec.from_classifier_rules if isinstance(r, Init)]
        fresh = {k: v for k, v in model.state_dict().items()
                 if k not in state and any(r.matches(k) for r in inits)}
        state = {**state, **fresh}
    model.load_state_dict(state, strict=True)


def create_torch_model(name: str, checkpoint=None, *, num_classes: int = 1000, img_size: Optional[int] = None,
                       ema: bool = False, key: Optional[str] = None, unsafe_pickle: bool = False, **model_kwargs):
    """An eval-mode torch reference model; ``checkpoint`` is a file path or a loaded Checkpoint;
    ``model_kwargs`` go to the factory."""
    spec = get_spec(name)
    model = spec.create_torch(num_classes=num_classes, img_size=img_size, **model_kwargs)
    if checkpoint is not None:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_model_checkpoint(
            spec, checkpoint, ema=ema, key=key, unsafe_pickle=unsafe_pickle)
        try:
            _load_reference(spec, ckpt, model)
        except RuntimeError as exc:
            raise UserError(f"{ckpt.path}: does not fit the torch reference of {spec.name}: "
                            f"{one_line(str(exc), 300)}") from None
    model.eval()
    return model


def count_parameters(spec: ModelSpec) -> int:
    """Trainable parameter count (shared modules counted once), without initialising weights.
    Paddle keeps BatchNorm running statistics as non-trainable parameters: not counted, as
    torch counts them as buffers."""
    model = paddle_skeleton(spec)
    return sum(math.prod(p.shape) for p in model.parameters() if p.trainable)
