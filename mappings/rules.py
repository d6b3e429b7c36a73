"""The vocabulary of mapping tables.

A family's table (``mappings/<family>.py``) is a tuple of these rules; the
engine in ``converter/engine.py`` applies them.  Rules name keys of the
*official* PyTorch state dict.  Nothing here looks at tensor shapes to decide
what to do: a Linear weight is transposed because a rule says it is one.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

# A check run on a dropped tensor; it returns an error message, or None when the
# tensor holds what the model would recompute anyway.
DropCheck = Callable[[str, np.ndarray], Optional[str]]


@dataclass(frozen=True)
class Drop:
    """Source keys matching ``pattern`` (a regex, searched) are not converted."""

    pattern: str
    reason: str
    check: Optional[DropCheck] = field(default=None, compare=False)

    def matches(self, key: str) -> bool:
        return re.search(self.pattern, key) is not None


@dataclass(frozen=True)
class Rename:
    """The last component of a key (the tensor's own name) changes: ``old`` -> ``new``."""

    old: str
    new: str

    def forward(self, key: str) -> Optional[str]:
        return _swap_leaf(key, self.old, self.new)

    def backward(self, key: str) -> Optional[str]:
        return _swap_leaf(key, self.new, self.old)


@dataclass(frozen=True)
class Move:
    """Keys under the module path ``pattern`` move under ``replacement`` (whole path components,
    the rest of the key kept): ``Move("stages.{i}.downsample", "downsample_layers.{i}")`` sends
    ``stages.2.downsample.0.weight`` to ``downsample_layers.2.0.weight``.  A ``{name}`` placeholder
    matches one integer component and must appear on both sides.  Derived by ``torch2paddle map``
    for pair files; read backwards for the reverse conversion and diff's layer pairing."""

    pattern: str
    replacement: str

    def forward(self, key: str) -> Optional[str]:
        return _move(key, self.pattern, self.replacement)

    def backward(self, key: str) -> Optional[str]:
        return _move(key, self.replacement, self.pattern)


_PLACEHOLDER = re.compile(r"^\{([a-z]\w*)\}$")


@functools.lru_cache(maxsize=None)
def _path_regex(template: str) -> "re.Pattern":
    """``stages.{i}.downsample`` -> a regex matching that module path at the start of a key."""
    parts = []
    for part in template.split(".") if template else []:
        placeholder = _PLACEHOLDER.match(part)
        parts.append(f"(?P<{placeholder.group(1)}>\\d+)" if placeholder else re.escape(part))
    return re.compile("^" + r"\.".join(parts) + r"(?=\.|$)")


def _move(key: str, pattern: str, replacement: str) -> Optional[str]:
    match = _path_regex(pattern).match(key)
    if match is None:
        return None
    return replacement.format(**match.groupdict()) + key[match.end():]


@dataclass(frozen=True)
class Split:
    """One source tensor is several target tensors: ``source`` (an exact key) is cut into
    ``len(targets)`` equal parts along ``axis`` of the torch tensor, in order -- a fused qkv Linear
    against separate q / k / v.  A part of a Linear weight (a Transpose rule matching ``source``)
    is transposed like the whole.  Read backwards, the parts are concatenated again."""

    source: str
    targets: tuple
    axis: int = 0


@dataclass(frozen=True)
class Transpose:
    """Source keys matching ``pattern`` are ``nn.Linear`` weights: torch (out, in) -> Paddle (in, out)."""

    pattern: str

    def matches(self, key: str) -> bool:
        return re.search(self.pattern, key) is not None


@dataclass(frozen=True)
class Init:
    """Target keys matching ``pattern`` that the checkpoint does not hold are set to ``value``,
    as the official code initialises them (a dense backbone's extra output norms, when it starts
    from an ImageNet classification checkpoint)."""

    pattern: str
    value: float
    reason: str

    def matches(self, key: str) -> bool:
        return re.search(self.pattern, key) is not None


@dataclass(frozen=True)
class Recompute:
    """Target keys matching ``pattern`` are persistent buffers the target model computes itself
    when it is built (index tables, e.g. PaddleClas's Swin ``relative_position_index``, which the
    torch model keeps as a non-persistent buffer): no source tensor fills them, and the converted
    file holds the value a freshly built target model has.  Written by ``map`` only when the
    torch model holds an equal non-persistent buffer at the paired place."""

    pattern: str
    reason: str

    def matches(self, key: str) -> bool:
        return re.search(self.pattern, key) is not None


def _swap_leaf(key: str, old: str, new: str) -> Optional[str]:
    module, _, leaf = key.rpartition(".")
    if leaf != old:
        return None
    return f"{module}.{new}" if module else new


# BatchNorm: Paddle names the running statistics differently and keeps no step counter.
BATCHNORM = (
    Rename("running_mean", "_mean"),
    Rename("running_var", "_variance"),
    Drop(r"(^|\.)num_batches_tracked$", "BatchNorm step counter; Paddle has none and eval never reads it"),
)


def linear_weights(*module_patterns: str) -> tuple[Transpose, ...]:
    """One Transpose rule per Linear module pattern (regex of the module path, without ``.weight``)."""
    return tuple(Transpose(rf"{p}\.weight$") for p in module_patterns)


# An ImageNet classification checkpoint as the start of a dense backbone (the usual detector
# initialisation): the classifier's head and final norm have no place in the backbone.
CLASSIFIER_HEAD = Drop(r"^head\.", "ImageNet classification head; a dense backbone has none")
CLASSIFIER_NORM = Drop(r"^norm\.", "final norm of the classifier; a dense backbone has none")


def fresh_norms(module_pattern: str, what: str) -> tuple[Init, Init]:
    """Norm layers a dense backbone adds, initialised as torch initialises any norm: weight 1, bias 0."""
    reason = f"{what} (weight 1, bias 0, as the official code initialises it)"
    return Init(rf"{module_pattern}\.weight$", 1.0, reason), Init(rf"{module_pattern}\.bias$", 0.0, reason)
