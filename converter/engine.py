"""The one mapping engine: applies a family's declarative rules to a state dict and proves
coverage (every source key converted or deliberately dropped, every target key filled
exactly once, shapes equal).  Works on numpy arrays and LazyArrays (checking keys and shapes
reads no data); imports neither torch nor paddle."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from mappings.rules import Drop, Init, Move, Recompute, Rename, Split, Transpose

from .errors import UserError
from .lazy import transposed


class MappingError(UserError):
    """The checkpoint does not fit the model: a one-line summary, plus one line per kind of
    problem (``details``, at most six examples each)."""

    def __init__(self, summary: str, details: list, count: int = 0):
        super().__init__(summary)
        self.details = details  # one line per kind of problem
        self.count = count


@dataclass
class ConversionReport:
    converted: int = 0
    transposed: int = 0
    renamed: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count
    allowed_missing: list = field(default_factory=list)
    initialised: dict = field(default_factory=dict)  # reason -> count (Init rules)
    num_parameters: int = 0

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())


def _split(rules: Iterable) -> tuple:
    """(drops, renames, transposes); Move rules count as renames (both change the key)."""
    rules = tuple(rules)
    return ([r for r in rules if isinstance(r, Drop)],
            [r for r in rules if isinstance(r, (Move, Rename))],
            [r for r in rules if isinstance(r, Transpose)])


def renamed_key(key: str, renames: Iterable) -> str:
    """``key`` after the first matching Move (its module path) and then the first matching
    Rename (its leaf); unchanged when none matches."""
    return _rewrite(key, renames, (Move, Rename), "forward")


def _rewrite(key: str, renames: Iterable, kinds: tuple, direction: str) -> str:
    """Apply, kind by kind in ``kinds`` order, the first rule of that kind whose ``direction``
    (``forward`` / ``backward``) rewrites ``key``."""
    renames = tuple(renames)
    for kind in kinds:
        for rule in renames:
            if isinstance(rule, kind):
                new = getattr(rule, direction)(key)
                if new is not None:
                    key = new
                    break
    return key


def target_key(key: str, rules: Iterable) -> Optional[str]:
    """Where a source key goes (a Split source: its first part), or None if a rule drops it."""
    rules = tuple(rules)
    drops, renames, _ = _split(rules)
    if any(d.matches(key) for d in drops):
        return None
    split = _split_rule(key, rules)
    return split.targets[0] if split else renamed_key(key, renames)


def _split_rule(key: str, rules: Iterable) -> Optional[Split]:
    return next((r for r in rules if isinstance(r, Split) and r.source == key), None)


def convert_state_dict(
    source: Mapping[str, np.ndarray],
    rules: Iterable,
    target_shapes: Mapping[str, tuple],
    allow_missing: Iterable[str] = (),
    computed: Optional[Callable[[list], Mapping[str, np.ndarray]]] = None,
) -> tuple:
    """Apply ``rules`` to ``source``; check the result against ``target_shapes`` exactly.

    ``computed(keys)`` returns the target model's own values of the keys Recompute rules name
    (buffers it computes when built).  ``allow_missing`` holds glob patterns of target keys that may
    stay unfilled, and whose source tensors may then be left over or differ in shape (e.g.
    ``head.*`` for a head with another class count).  Returns ``(state_dict, report)``; raises MappingError otherwise.
    """
    rules = tuple(rules)
    drops, renames, transposes = _split(rules)
    allow = tuple(allow_missing)
    allowed = lambda key: any(fnmatch.fnmatchcase(key, p) for p in allow)  # noqa: E731
    report = ConversionReport()
    out: dict = {}
    filled_by: dict = {}
    unexpected, mismatched, duplicated, failed_checks, bad_transpose = [], [], [], [], []
    reported = set()  # target keys already named as a shape mismatch, not to be listed as missing too

    for key, value in source.items():
        drop = next((d for d in drops if d.matches(key)), None)
        if drop is not None:
            problem = drop.check(key, np.asarray(value)) if drop.check else None
            if problem:
                failed_checks.append(f"{key}: {problem}")
            report.dropped[drop.reason] = report.dropped.get(drop.reason, 0) + 1
            continue
        split = _split_rule(key, rules)
        if split is not None:
            parts = _split_parts(key, value, split, any(t.matches(key) for t in transposes), mismatched)
            placements = list(zip(split.targets, parts))
            report.renamed += len(placements)
            if any(t.matches(key) for t in transposes):
                report.transposed += len(placements)
        else:
            new_key = renamed_key(key, renames)
            if new_key != key:
                report.renamed += 1
            if any(t.matches(key) for t in transposes):
                if np.ndim(value) != 2:
                    bad_transpose.append(f"{key} {tuple(np.shape(value))}")
                    continue
                value = transposed(value)  # stays lazy for a lazily read checkpoint
                report.transposed += 1
            placements = [(new_key, value)]
        for new_key, value in placements:
            _place(key, new_key, value, target_shapes, allowed, out, filled_by, report,
                   unexpected, duplicated, mismatched, reported)

    missing = [k for k in target_shapes if k not in out and k not in reported]
    missing = _initialise(missing, rules, target_shapes, out, report)
    missing = _recompute(missing, rules, target_shapes, out, report, computed)
    report.allowed_missing = [k for k in missing if allowed(k)]
    missing = [k for k in missing if not allowed(k)]

    _raise_problems("checkpoint does not match the model", (
        ("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
        ("filled twice", duplicated), ("dropped-key check failed", failed_checks),
        ("transpose rule on a non-2-D tensor", bad_transpose)))

    # Emit in the model's own order, so output files are deterministic and read naturally.
    ordered = {k: out[k] for k in target_shapes if k in out}
    return ordered, report


def _place(key, new_key, value, target_shapes, allowed, out, filled_by, report, unexpected, duplicated,
           mismatched, reported) -> None:
    """Put one converted tensor at ``new_key``, or record why it does not fit there."""
    if new_key not in target_shapes:
        if not allowed(new_key):
            unexpected.append(key)
        return
    if new_key in filled_by:
        duplicated.append(f"{new_key} <- {filled_by[new_key]}, {key}")
        return
    expected = tuple(target_shapes[new_key])
    if tuple(np.shape(value)) != expected:
        if not allowed(new_key):
            mismatched.append(f"{key} {tuple(np.shape(value))} -> {new_key} expects {expected}")
            reported.add(new_key)
        return
    filled_by[new_key] = key
    out[new_key] = value
    report.converted += 1
    report.num_parameters += int(np.size(value))


def _split_parts(key: str, value, split: Split, linear: bool, mismatched: list) -> list:
    """The parts of a Split source (each transposed for a Linear weight); [] when it cannot be cut."""
    value = np.asarray(value)
    n = len(split.targets)
    if value.ndim <= split.axis or value.shape[split.axis] % n:
        mismatched.append(f"{key} {tuple(value.shape)} cannot be cut into {n} equal parts along axis {split.axis}")
        return []
    parts = np.split(value, n, axis=split.axis)
    return [np.ascontiguousarray(p.T) if linear and p.ndim == 2 else p for p in parts]


def _initialise(missing: list, rules: Iterable, target_shapes: Mapping[str, tuple], out: dict,
                report: ConversionReport) -> list:
    """Fill the missing keys an Init rule names with its value; return the keys still missing."""
    inits = [r for r in rules if isinstance(r, Init)]
    still_missing = []
    for key in missing:
        init = next((r for r in inits if r.matches(key)), None)
        if init is None:
            still_missing.append(key)
            continue
        out[key] = np.full(tuple(target_shapes[key]), init.value, dtype=np.float32)
        report.initialised[init.reason] = report.initialised.get(init.reason, 0) + 1
    return still_missing


def _recompute(missing: list, rules: Iterable, target_shapes: Mapping[str, tuple], out: dict,
               report: ConversionReport, computed) -> list:
    """Fill the missing keys a Recompute rule names with the target model's own value (shape
    checked); return the keys still missing."""
    rules = [r for r in rules if isinstance(r, Recompute)]
    named = {key: next((r for r in rules if r.matches(key)), None) for key in missing}
    wanted = [key for key, rule in named.items() if rule is not None]
    if not wanted:
        return missing
    if computed is None:
        raise UserError(f"{len(wanted)} key(s) the target model computes itself (e.g. {wanted[0]}) "
                        f"need that model's values, which this conversion was not given")
    values = computed(wanted)
    for key in wanted:
        value = np.asarray(values[key])
        if tuple(value.shape) != tuple(target_shapes[key]):
            raise UserError(f"{key}: the model computes shape {tuple(value.shape)}, the layout says "
                            f"{tuple(target_shapes[key])}")
        out[key] = value
        reason = named[key].reason
        report.initialised[reason] = report.initialised.get(reason, 0) + 1
    return [key for key in missing if named[key] is None]


def shapes_fit(source_shapes: Mapping[str, tuple], rules: Iterable, target_shapes: Mapping[str, tuple]) -> bool:
    """Whether a state dict with these key shapes converts cleanly (no tensors needed)."""
    rules = tuple(rules)
    _, _, transposes = _split(rules)
    mapped = {}
    for key, shape in source_shapes.items():
        new = target_key(key, rules)
        if new is not None:
            mapped[new] = tuple(shape)[::-1] if any(t.matches(key) for t in transposes) else tuple(shape)
    return mapped == {k: tuple(v) for k, v in target_shapes.items()}


def reverse_key(key: str, rules: Iterable) -> str:
    """The official torch key for a Paddle key (renames read backwards)."""
    _, renames, _ = _split(rules)
    return _rewrite(key, renames, (Rename, Move), "backward")  # undone in the opposite order: leaf, then path


def _raise_problems(what: str, groups) -> None:
    """Raise one MappingError for every non-empty (label, items) group: a one-line summary,
    then one detail line per group."""
    problems = [(label, items) for label, items in groups if items]
    if not problems:
        return
    summary = "; ".join(f"{len(items)} {label} (e.g. {items[0]})" for label, items in problems)
    details = [f"{label} ({len(items)}): " + ", ".join(items[:6]) + (", ..." if len(items) > 6 else "")
               for label, items in problems]
    raise MappingError(f"{what}: {summary}", details, sum(len(items) for _, items in problems))


def _join_splits(params: Mapping, rules: tuple, transposes: list, out: dict, report: ConversionReport) -> dict:
    """Split rules read backwards: the parts concatenated into their source (in ``out``); returns
    the Paddle tensors left to map one to one.  A part that is missing is left to be reported."""
    left = dict(params)
    for split in (r for r in rules if isinstance(r, Split)):
        if not all(t in left for t in split.targets):
            continue
        linear = any(t.matches(split.source) for t in transposes)
        parts = [np.asarray(left.pop(t)) for t in split.targets]
        parts = [p.T if linear and p.ndim == 2 else p for p in parts]
        out[split.source] = np.ascontiguousarray(np.concatenate(parts, axis=split.axis))
        report.converted += 1
        report.renamed += len(parts)
    return left


def reverse_state_dict(params: Mapping[str, np.ndarray], rules: Iterable,
                       reference_shapes: Mapping[str, tuple]) -> tuple:
    """The table read backwards: a Paddle state dict -> the official torch state dict.

    Each Paddle key goes back to the torch key the table maps onto it (renames undone, Linear
    weights transposed back by the same Transpose rules), and every tensor must come back to a
    key of ``reference_shapes`` (the torch reference's state dict) with its shape.  Keys the
    reference has but the table drops (e.g. BatchNorm ``num_batches_tracked``) cannot come from
    Paddle weights: they are returned by name for the caller to fill.  Returns
    ``(state_dict without those keys, [dropped keys], report)``, in the reference's key order;
    raises MappingError when the weights do not fit.
    """
    rules = tuple(rules)
    _, _, transposes = _split(rules)
    splits = {r.source for r in rules if isinstance(r, Split)}
    targets = {k: target_key(k, rules) for k in reference_shapes if k not in splits}  # None: dropped
    report = ConversionReport()
    out: dict = {}
    unexpected, mismatched, bad_transpose = [], [], []
    reported = set()  # torch keys already named as a problem, not to be listed as missing too
    recomputed = [r for r in rules if isinstance(r, Recompute)]
    params = _join_splits(params, rules, transposes, out, report)
    for key, value in params.items():
        if any(r.matches(key) for r in recomputed):
            continue  # a buffer the Paddle model computes itself: the torch checkpoint never held it
        torch_key = reverse_key(key, rules)
        if targets.get(torch_key) != key:
            unexpected.append(key)  # no official key the table maps onto this one
            continue
        if torch_key != key:
            report.renamed += 1
        if any(t.matches(torch_key) for t in transposes):
            if np.ndim(value) != 2:
                bad_transpose.append(f"{key} {tuple(np.shape(value))}")
                reported.add(torch_key)
                continue
            value = transposed(value)
            report.transposed += 1
        expected = tuple(reference_shapes[torch_key])
        if tuple(np.shape(value)) != expected:
            mismatched.append(f"{key} {tuple(np.shape(value))} -> {torch_key} expects {expected}")
            reported.add(torch_key)
            continue
        out[torch_key] = value
        report.converted += 1
        report.num_parameters += int(np.size(value))
    dropped = [k for k, target in targets.items() if target is None]
    missing = [target for k, target in targets.items() if target is not None and k not in out
               and k not in reported]  # named as the Paddle key that should have been there
    for split in (r for r in rules if isinstance(r, Split) and r.source in reference_shapes):
        if split.source not in out:
            missing += [t for t in split.targets if t not in params]
        elif tuple(out[split.source].shape) != tuple(reference_shapes[split.source]):
            mismatched.append(f"{', '.join(split.targets)} joined {tuple(out[split.source].shape)} -> "
                              f"{split.source} expects {tuple(reference_shapes[split.source])}")
    _raise_problems("Paddle weights do not match the torch reference", (
        ("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
        ("transpose rule on a non-2-D tensor", bad_transpose)))
    return {k: out[k] for k in reference_shapes if k in out}, dropped, report
