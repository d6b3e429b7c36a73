"""map: derive the mapping between a torch model and a Paddle model from one forward of each.

How it pairs (the rules a reviewer of a pair file can rely on):

* A *unit* is a module that owns tensors itself (parameters or persistent buffers) -- usually a
  leaf layer, but also e.g. timm's BatchNormAct2d or an attention module owning a
  relative-position table.  Its *kind* is ``conv``, ``linear``, ``norm`` or ``embedding`` by the
  framework class it is (``linear`` only for a real ``nn.Linear``: a Linear weight is transposed
  because of what the module is, never because shapes fit; conv / norm also by a class name
  containing Conv / Norm), else ``param`` (cls_token, pos_embed, layer-scale gammas,
  relative-position tables, ...).
* Both models run one seeded batch with hooks; each unit's order is when its forward is first
  entered.  Layer units (conv / linear / norm / embedding) are paired in that order, each pair
  checked for the same kind, the same tensor shapes (a Linear weight compared transposed) and the
  same output size (layouts differ: NCHW vs NHWC, (N, H*W, C) tokens).  ``param`` units form a second
  sequence, ordered by first entry of the owning module and then registration order (a module
  never called comes after those that were, by registration), paired the same way: the place a
  table lives relative to the layers may differ between implementations; its order of use not.
* Inside a pair, tensors pair by role: the same name (``running_mean`` / ``running_var`` are
  Paddle's ``_mean`` / ``_variance``), else the one remaining tensor of that shape.
  ``num_batches_tracked`` is dropped.  A Paddle persistent buffer the torch unit holds as an
  equal non-persistent buffer (PaddleClas Swin's ``relative_position_index``) is recomputed.
* Anything else stops with an error that names both sides' paths and says how to state the
  answer in the pair file's ``[hand]`` section: two units with the same input and the same
  shapes (their call order is an implementation detail, so which is which is not decided), a
  module holding weights with no counterpart, a shape or kind mismatch, a fused layer against
  separate ones (q/k/v), a module that holds weights but never runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import UserError
from .engine import MappingError
from mappings.rules import Drop, Move, Recompute, Rename, Split, Transpose

ROLES = {"running_mean": "mean", "_mean": "mean", "running_var": "variance", "_variance": "variance"}
STEP_COUNTER = "num_batches_tracked"
LAYER_KINDS = ("conv", "linear", "norm", "embedding")
NUMBER = re.compile(r"^\d+$")  # a numbered path component (Sequential / ModuleList index)


@dataclass
class Unit:
    path: str  # module path, '' for the model itself
    kind: str
    cls: str  # class name, for messages
    shapes: dict  # tensor name -> shape, persistent tensors in registration order
    params: tuple  # names of the parameters among them (the rest are buffers)
    buffers: dict = field(default_factory=dict)  # every buffer's value, persistent or not (evidence)
    is_linear: bool = False  # a real nn.Linear / paddle.nn.Linear
    order: Optional[int] = None  # when its forward was first entered (None: never ran)
    out_shape: Optional[tuple] = None
    input_id: Optional[int] = None  # identity of its first input tensor, to find siblings
    output_id: Optional[int] = None  # identity of its first output tensor, to follow a conv into its norm
    registration: int = 0

    def canonical(self, name: str, framework: str) -> tuple:
        """The tensor's shape as Paddle lays it out (a torch Linear weight transposed)."""
        shape = tuple(self.shapes[name])
        return shape[::-1] if framework == "torch" and self.is_linear and name == "weight" else shape

    def signature(self, framework: str) -> tuple:
        names = self.params if self.kind == "param" else [n for n in self.shapes if n != STEP_COUNTER]
        return self.kind, tuple(sorted(self.canonical(n, framework) for n in names))

    def describe(self, framework: str) -> str:
        shapes = ", ".join(f"{n} {list(self.shapes[n])}" for n in self.shapes if n != STEP_COUNTER)
        ran = "never ran" if self.order is None else f"output {list(self.out_shape or [])}"
        return f"{self.path or '<model>'} ({self.cls}, {self.kind}: {shapes}; {ran})"


@dataclass
class HandEdits:
    """What a person stated in the pair file's [hand] section; map honours it when re-run."""

    modules: list = field(default_factory=list)  # [[torch module path, paddle module path]]
    keys: list = field(default_factory=list)  # [[torch key, paddle key]]
    drops: list = field(default_factory=list)  # [[torch key, reason]]
    splits: list = field(default_factory=list)  # [[torch key, [paddle keys]]]: cut along the torch axis 0

    @property
    def count(self) -> int:
        return len(self.modules) + len(self.keys) + len(self.drops) + len(self.splits)

    @classmethod
    def from_toml(cls, table: dict) -> "HandEdits":
        def pairs(name):
            value = table.get(name, [])
            if not isinstance(value, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in value):
                raise UserError(f"[hand] {name} must be a list of [\"...\", \"...\"] pairs")
            return [list(p) for p in value]
        splits = table.get("splits", [])
        if not isinstance(splits, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)
                and len(p[1]) > 1 and all(isinstance(t, str) for t in p[1]) for p in splits):
            raise UserError('[hand] splits must be a list of ["torch key", ["paddle key", "paddle key", ...]]')
        return cls(pairs("modules"), pairs("keys"), pairs("drops"), [[p[0], list(p[1])] for p in splits])


@dataclass
class KeyMap:
    """The derived mapping: torch key -> Paddle key (and whether transposed), what is dropped and
    why, which Paddle keys are recomputed; the unit pairs it came from."""

    pairs: dict = field(default_factory=dict)  # torch key -> paddle key
    transposed: set = field(default_factory=set)  # torch keys (nn.Linear weights)
    drops: dict = field(default_factory=dict)  # torch key -> reason
    recomputed: dict = field(default_factory=dict)  # paddle key -> reason
    splits: dict = field(default_factory=dict)  # torch key -> [paddle keys] (stated by hand)
    unit_pairs: list = field(default_factory=list)  # [(torch path, paddle path)]


# --- collecting units -----------------------------------------------------------------------

def _torch_kind(module) -> tuple:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return "linear", True
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", False
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return "norm", False
    if isinstance(module, nn.Embedding):
        return "embedding", False
    return _kind_by_name(module, next(module.children(), None) is None), False


def _paddle_kind(layer) -> tuple:
    import paddle.nn as nn

    if isinstance(layer, nn.Linear):
        return "linear", True
    if isinstance(layer, nn.layer.conv._ConvNd):
        return "conv", False
    norms = tuple(c for c in (getattr(nn, n, None) for n in (
        "BatchNorm", "BatchNorm1D", "BatchNorm2D", "BatchNorm3D", "SyncBatchNorm", "LayerNorm", "GroupNorm",
        "InstanceNorm1D", "InstanceNorm2D", "InstanceNorm3D")) if c is not None)
    if isinstance(layer, norms + (nn.layer.norm._BatchNormBase,)):
        return "norm", False
    if isinstance(layer, nn.Embedding):
        return "embedding", False
    return _kind_by_name(layer, not layer._sub_layers), False


def _kind_by_name(module, leaf: bool) -> str:
    """Custom leaf layers with a ``weight``: a class named ...Conv... holds a conv's weights,
    ...Norm... a norm's (PaddleClas's ChannelsFirstLayerNorm, timm's StdConv2d).  Blocks named
    after what they contain (ConvNeXtBlock) are not layers."""
    if not leaf or "weight" not in getattr(module, "_parameters", {}):
        return "param"
    lowered = type(module).__name__.lower()
    if "conv" in lowered:
        return "conv"
    if "norm" in lowered:
        return "norm"
    return "param"


def _units(modules, kind_of, to_numpy, non_persistent: str) -> dict:
    """A Unit for every module in ``modules`` ((path, module) pairs) that holds tensors: its
    parameters, and its buffers (persistent ones in its state dict, all kept as arrays)."""
    units = {}
    for path, module in modules:
        shapes, buffers = {}, {}
        params = tuple(n for n, p in module._parameters.items() if p is not None)
        for n in params:
            shapes[n] = tuple(module._parameters[n].shape)
        for n, b in module._buffers.items():
            if b is None:
                continue
            buffers[n] = to_numpy(b)
            if n not in getattr(module, non_persistent):
                shapes[n] = tuple(b.shape)
        if shapes:
            kind, is_linear = kind_of(module)
            units[path] = Unit(path, kind, type(module).__name__, shapes, params, buffers, is_linear,
                               registration=len(units))
    return units


def torch_units(model) -> dict:
    return _units(model.named_modules(), _torch_kind, lambda b: b.detach().cpu().numpy(),
                  "_non_persistent_buffers_set")


def _paddle_sublayers(model) -> list:
    """(path, layer) for the model and every sublayer, first name only (as named_sublayers)."""
    return [("", model)] + list(model.named_sublayers())


def paddle_units(model) -> dict:
    return _units(_paddle_sublayers(model), _paddle_kind, lambda b: b.numpy(),
                  "_non_persistable_buffer_names_set")


def _first_tensor(value, tensor_type):
    if isinstance(value, tensor_type):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item, tensor_type)
            if found is not None:
                return found
    return None


class _ExecutionRecorder:
    """Forward hooks noting, per unit, the order of its first call, the identity of its first input
    tensor and the shape and identity of its first output tensor (the same for both frameworks)."""

    def __init__(self, tensor_type):
        self.tensor_type = tensor_type
        self.clock = 0
        self.kept = []  # every recorded tensor stays alive until the forward ends: its id stays unique

    def _first(self, value):
        first = _first_tensor(value, self.tensor_type)
        self.kept.append(first)
        return first

    def pre(self, unit):
        def hook(module, args):
            if unit.order is None:
                unit.order = self.clock
                self.clock += 1
                first = self._first(args)
                unit.input_id = id(first) if first is not None else None
        return hook

    def post(self, unit):
        def hook(module, args, output):
            if unit.out_shape is None:
                first = self._first(output)
                unit.out_shape = tuple(first.shape) if first is not None else ()
                unit.output_id = id(first) if first is not None else None
        return hook


def _run_recorded(units: dict, recorder: _ExecutionRecorder, hook_points, run):
    """``run()`` with the recorder's hooks on every unit, returning what it returns;
    ``hook_points(path)`` gives the module's (register pre-hook, register post-hook) functions."""
    handles = []
    for unit in units.values():
        register_pre, register_post = hook_points(unit.path)
        handles.append(register_pre(recorder.pre(unit)))
        handles.append(register_post(recorder.post(unit)))
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def trace_torch(model, units: dict, batch: np.ndarray):
    """Run ``batch`` through the torch model, recording each unit's first entry, input and output;
    returns the model's output."""
    import torch

    modules = dict(model.named_modules())

    def run():
        with torch.no_grad():
            return model(torch.from_numpy(batch))

    return _run_recorded(units, _ExecutionRecorder(torch.Tensor),
                  lambda path: (modules[path].register_forward_pre_hook, modules[path].register_forward_hook), run)


def trace_paddle(model, units: dict, batch: np.ndarray) -> None:
    """The same for the Paddle model."""
    import paddle

    layers = dict(_paddle_sublayers(model))

    def run():
        with paddle.no_grad():
            model(paddle.to_tensor(batch))

    _run_recorded(units, _ExecutionRecorder(paddle.Tensor),
                  lambda path: (layers[path].register_forward_pre_hook, layers[path].register_forward_post_hook), run)


# --- pairing --------------------------------------------------------------------------------

def _hand_snippet(lines: list) -> str:
    return "state it in the pair file's [hand] section and re-run map, e.g. " + "; ".join(lines)


def _sequence(units: dict, layers: bool, framework: str) -> list:
    """Units in the order they ran, except where an implementation's choice of order is no part
    of the network: units fed the same input tensor (parallel branches: RepVGG's 3x3 / 1x1, a
    block's conv1 and its downsample) form one cluster at the first one's place, ordered inside by
    their shapes and output size, each followed by the norm that takes its output directly.
    Members of a cluster that cannot be told apart stay undecided (check_siblings)."""
    chosen = [u for u in units.values() if (u.kind in LAYER_KINDS) == layers]
    ran = [u for u in chosen if u.order is not None]
    first: dict = {}
    members: dict = {}
    for u in ran:
        if u.input_id is not None:
            first[u.input_id] = min(first.get(u.input_id, u.order), u.order)
            members[u.input_id] = members.get(u.input_id, 0) + 1
    producer = {u.output_id: u for u in ran if u.output_id is not None}
    keys: dict = {}

    def key(u) -> tuple:
        if u.path not in keys:
            keys[u.path] = ((u.order, "", u.order),)  # provisional: guards against cycles
            if layers and u.input_id is not None and members[u.input_id] > 1:
                keys[u.path] = ((first[u.input_id], _sibling_key(u, framework), u.order),)
            elif layers and u.kind == "norm" and u.input_id in producer:
                parent = producer[u.input_id]  # a branch's norm goes with its conv / linear
                if parent.kind in ("conv", "linear") and members.get(parent.input_id, 0) > 1:
                    keys[u.path] = key(parent) + ((u.order, "", u.order),)
        return keys[u.path]

    never = sorted((u for u in chosen if u.order is None), key=lambda u: u.registration)
    return sorted(ran, key=key) + never


def _sibling_key(u: Unit, framework: str) -> str:
    return repr((u.signature(framework), _shape_key(u.out_shape or ())))


def _compatible(t: Unit, p: Unit) -> bool:
    if t.signature("torch") != p.signature("paddle"):
        return False
    if t.out_shape is not None and p.out_shape is not None and t.kind != "param":
        return _shape_key(t.out_shape) == _shape_key(p.out_shape)
    return True


def _shape_key(shape: tuple) -> int:
    """An output's size: implementations lay the same activations out differently (NCHW vs NHWC,
    (N, H, W, C) vs (N, H*W, C), (N, C, 1, 1) vs (N, C)); the tensor shapes are compared exactly."""
    return int(np.prod(shape))


def _never_ran(units: dict) -> list:
    return [u for u in units.values() if u.kind in LAYER_KINDS and u.order is None]


def align(t_seq: list, p_seq: list, what: str) -> list:
    """Pair two unit sequences position by position; any disagreement is an error naming both sides."""
    pairs = []
    for i in range(max(len(t_seq), len(p_seq))):
        if i >= len(t_seq) or i >= len(p_seq):
            extra, side = (p_seq[i:], "paddle") if i >= len(t_seq) else (t_seq[i:], "torch")
            raise _unpaired(extra, side, what)
        t, p = t_seq[i], p_seq[i]
        if not _compatible(t, p):
            raise _diagnose(t_seq, p_seq, i, what)
        pairs.append((t, p))
    return pairs


def _unpaired(extra: list, side: str, what: str) -> MappingError:
    other = "paddle" if side == "torch" else "torch"
    return MappingError(
        f"{len(extra)} {side} {what} hold weights with no {other} counterpart "
        f"(first: {extra[0].path or '<model>'}); "
        + _hand_snippet(['keys = [["<torch key>", "<paddle key>"]]', 'drops = [["<torch key>", "why"]]']),
        [f"{side}: {u.describe(side)}" for u in extra[:6]])


def _diagnose(t_seq: list, p_seq: list, i: int, what: str) -> MappingError:
    t, p = t_seq[i], p_seq[i]
    context = [f"torch  #{j}: {t_seq[j].describe('torch')}" for j in range(max(0, i - 1), min(len(t_seq), i + 3))]
    context += [f"paddle #{j}: {p_seq[j].describe('paddle')}" for j in range(max(0, i - 1), min(len(p_seq), i + 3))]
    fused = _fused(t, p_seq[i:], "paddle") or _fused(p, t_seq[i:], "torch")
    if fused:
        return MappingError(fused, context)
    skip_p, skip_t = _resync(t_seq[i:], p_seq[i:]), _resync(p_seq[i:], t_seq[i:], swap=True)
    if skip_p:
        extra = ", ".join(u.path for u in p_seq[i:i + skip_p])
        summary = (f"unpaired module(s) holding weights: paddle {extra} ({p.cls}) have no torch counterpart "
                   f"before torch {t.path}")
    elif skip_t:
        extra = ", ".join(u.path for u in t_seq[i:i + skip_t])
        summary = (f"unpaired module(s) holding weights: torch {extra} ({t.cls}) have no paddle counterpart "
                   f"before paddle {p.path}")
    elif t.signature("torch") == p.signature("paddle"):
        summary = (f"output shape mismatch at {what} #{i}: torch {t.path} {list(t.out_shape or [])} vs paddle "
                   f"{p.path} {list(p.out_shape or [])}")
    elif t.kind == p.kind:
        summary = (f"shape mismatch at {what} #{i}: torch {t.path} {t.signature('torch')[1]} "
                   f"vs paddle {p.path} {p.signature('paddle')[1]}")
    else:
        summary = f"kind mismatch at {what} #{i}: torch {t.path} is a {t.kind}, paddle {p.path} a {p.kind}"
    hint = _hand_snippet([f'modules = [["{t.path}", "<paddle module>"]]', 'keys = [["<torch key>", "<paddle key>"]]',
                          'drops = [["<torch key>", "why"]]'])
    return MappingError(f"{summary}; {hint}", context)


def _resync(t_seq: list, p_seq: list, swap: bool = False, window: int = 3) -> int:
    """How many leading units of ``p_seq`` to skip so that the next two units pair again (0: none)."""
    fits = (lambda a, b: _compatible(b, a)) if swap else _compatible
    for skip in range(1, window + 1):
        if len(p_seq) > skip + 1 and len(t_seq) > 1 and fits(t_seq[0], p_seq[skip]) and fits(t_seq[1], p_seq[skip + 1]):
            return skip
    return 0


def _fused(one: Unit, others: list, other_side: str) -> Optional[str]:
    """'one' is a single layer whose output is several consecutive same-input layers' outputs together."""
    if one.kind not in ("linear", "conv") or len(others) < 2:
        return None
    side = "torch" if other_side == "paddle" else "paddle"
    out_dim = one.canonical("weight", side)[-1 if one.kind == "linear" else 0] if "weight" in one.shapes else None
    run, total = [], 0
    for u in others:
        if u.kind != one.kind or (run and u.input_id != run[0].input_id) or "weight" not in u.shapes:
            break
        run.append(u)
        total += u.canonical("weight", other_side)[-1 if u.kind == "linear" else 0]
        if total == out_dim and len(run) > 1:
            parts = ", ".join(u.path for u in run)
            if side == "torch":
                targets = ", ".join(f'"{_key(u.path, "weight")}"' for u in run)
                how = _hand_snippet([f'splits = [["{_key(one.path, "weight")}", [{targets}]]] (and the biases alike)'])
            else:
                how = "joining several torch tensors into one Paddle tensor is not a rule: adapt one model"
            return (f"fused vs separate: {side} {one.path} ({out_dim} outputs) is {other_side} {parts} "
                    f"concatenated; {how}")
    return None


def check_siblings(pairs: list, hand_modules: set) -> None:
    """Two units fed the same input with the same shapes and output size: their call order is an
    implementation detail, so order-based pairing cannot tell which is which."""
    groups: dict = {}
    for t, p in pairs:
        if t.input_id is None or t.path in hand_modules:
            continue
        groups.setdefault((t.input_id, _sibling_key(t, "torch")), []).append((t, p))
    for members in groups.values():
        if len(members) > 1:
            torch_paths = ", ".join(t.path for t, _ in members)
            paddle_paths = ", ".join(p.path for _, p in members)
            example = ", ".join(f'["{t.path}", "{p.path}"]' for t, p in members)
            raise MappingError(
                f"ambiguous: torch {torch_paths} take the same input and have the same shapes, as do paddle "
                f"{paddle_paths}; which is which is not decided by call order; "
                + _hand_snippet([f"modules = [{example}] if that order is right"]),
                [f"torch:  {t.describe('torch')}" for t, _ in members]
                + [f"paddle: {p.describe('paddle')}" for _, p in members])


def pair_tensors(t: Unit, p: Unit, keymap: KeyMap) -> None:
    """The tensors of one unit pair, by role, into ``keymap``."""
    t_names = [n for n in t.shapes if n != STEP_COUNTER]
    for n in t.shapes:
        if n == STEP_COUNTER:
            keymap.drops[_key(t.path, n)] = "BatchNorm step counter; Paddle has none and eval never reads it"
    p_names = list(p.shapes)
    matched = []
    for n in list(t_names):
        role = ROLES.get(n, n)
        twin = next((m for m in p_names if ROLES.get(m, m) == role), None)
        if twin is not None:
            matched.append((n, twin))
            t_names.remove(n)
            p_names.remove(twin)
    for n in list(t_names):  # left: by the one remaining tensor of the same shape
        same = [m for m in p_names if p.canonical(m, "paddle") == t.canonical(n, "torch")]
        rivals = [o for o in t_names if t.canonical(o, "torch") == t.canonical(n, "torch")]
        if len(same) == 1 and len(rivals) == 1:
            matched.append((n, same[0]))
            t_names.remove(n)
            p_names.remove(same[0])
        elif len(same) > 1 or len(rivals) > 1:
            raise MappingError(
                f"ambiguous: torch {t.path}.{{{', '.join(rivals)}}} and paddle {p.path}.{{{', '.join(same)}}} have "
                f"the same shape {list(t.canonical(n, 'torch'))} and different names; "
                + _hand_snippet([f'keys = [["{_key(t.path, n)}", "{_key(p.path, same[0])}"]]']), [])
    for n in list(p_names):  # a Paddle buffer the torch model recomputes at the same place
        if n not in p.params and n in t.buffers and np.array_equal(t.buffers[n], p.buffers.get(n)):
            keymap.recomputed[_key(p.path, n)] = (f"buffer the Paddle model computes when built; torch holds "
                                                   f"an equal non-persistent '{n}'")
            p_names.remove(n)
    for n in list(t_names):  # a torch buffer the Paddle model recomputes at the same place
        if n not in t.params and n in p.buffers and np.array_equal(t.buffers[n], p.buffers[n]):
            keymap.drops[_key(t.path, n)] = (f"buffer the Paddle model computes itself (an equal "
                                             f"non-persistent '{n}')")
            t_names.remove(n)
    for n, m in matched:
        if t.canonical(n, "torch") != p.canonical(m, "paddle"):
            raise MappingError(
                f"shape mismatch: torch {_key(t.path, n)} {list(t.shapes[n])} vs paddle {_key(p.path, m)} "
                f"{list(p.shapes[m])}" + (" (an nn.Linear weight, compared transposed)" if t.is_linear and n == "weight"
                                          else ""), [])
        keymap.pairs[_key(t.path, n)] = _key(p.path, m)
        if t.is_linear and n == "weight":
            keymap.transposed.add(_key(t.path, n))
    if t_names or p_names:
        left = [f"torch {_key(t.path, n)}" for n in t_names] + [f"paddle {_key(p.path, n)}" for n in p_names]
        raise MappingError(f"unpaired tensors in torch {t.path} / paddle {p.path}: {', '.join(left)}; "
                           + _hand_snippet(['keys = [["<torch key>", "<paddle key>"]]',
                                            'drops = [["<torch key>", "why"]]']),
                           [])


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def derive_keymap(t_units: dict, p_units: dict, hand: HandEdits) -> KeyMap:
    """Pair the units of both models (hand edits first) and their tensors."""
    keymap = KeyMap()
    _apply_hand_keys(t_units, p_units, hand, keymap)
    hand_modules = set()
    for t_path, p_path in hand.modules:
        t, p = _unit(t_units, t_path, "torch"), _unit(p_units, p_path, "paddle")
        pair_tensors(t, p, keymap)
        keymap.unit_pairs.append((t.path, p.path))
        hand_modules.add(t_path)
        del t_units[t_path], p_units[p_path]
    never = _never_ran(t_units) + _never_ran(p_units)
    if never:
        raise MappingError(
            f"{len(never)} module(s) hold weights but never ran in the forward, so nothing places them "
            f"(first: {never[0].path}); " + _hand_snippet(['modules = [["<torch module>", "<paddle module>"]]',
                                                           'drops = [["<torch key>", "why"]]']),
            [u.describe("?") for u in never[:6]])
    pairs = align(_sequence(t_units, True, "torch"), _sequence(p_units, True, "paddle"), "layer")
    check_siblings(pairs, hand_modules)
    pairs += align(_sequence(t_units, False, "torch"), _sequence(p_units, False, "paddle"), "parameter-holding module")
    for t, p in pairs:
        pair_tensors(t, p, keymap)
        keymap.unit_pairs.append((t.path, p.path))
    return keymap


def _unit(units: dict, path: str, side: str) -> Unit:
    if path not in units:
        raise UserError(f"[hand]: {side} model has no module '{path}' holding tensors (or it is paired twice)")
    return units[path]


def _apply_hand_keys(t_units: dict, p_units: dict, hand: HandEdits, keymap: KeyMap) -> None:
    """Hand-paired and hand-dropped tensors leave their units (a unit left empty leaves too)."""
    def take(units, key, side):
        path, _, name = key.rpartition(".")
        unit = units.get(path)
        if unit is None or name not in unit.shapes:
            raise UserError(f"[hand]: {side} model has no tensor '{key}'")
        unit.shapes.pop(name)
        unit.params = tuple(n for n in unit.params if n != name)
        if not unit.shapes:
            del units[path]
        return unit
    for t_key, p_key in hand.keys:
        t = take(t_units, t_key, "torch")
        take(p_units, p_key, "paddle")
        keymap.pairs[t_key] = p_key
        if t.is_linear and t_key.endswith(".weight"):
            keymap.transposed.add(t_key)
    for t_key, reason in hand.drops:
        take(t_units, t_key, "torch")
        keymap.drops[t_key] = reason
    for t_key, p_keys in hand.splits:
        t = take(t_units, t_key, "torch")
        for p_key in p_keys:
            take(p_units, p_key, "paddle")
        keymap.splits[t_key] = list(p_keys)
        if t.is_linear and t_key.endswith(".weight"):
            keymap.transposed.add(t_key)


def check_complete(keymap: KeyMap, torch_keys: list, paddle_keys: list) -> None:
    """Every torch key paired or dropped, every Paddle key filled exactly once."""
    unaccounted = [k for k in torch_keys if k not in keymap.pairs and k not in keymap.drops
                   and k not in keymap.splits]
    filled: dict = {}
    for t_key, p_key in keymap.pairs.items():
        filled.setdefault(p_key, []).append(t_key)
    for t_key, p_keys in keymap.splits.items():
        for p_key in p_keys:
            filled.setdefault(p_key, []).append(t_key)
    twice = [f"{p} <- {', '.join(t)}" for p, t in filled.items() if len(t) > 1]
    unfilled = [k for k in paddle_keys if k not in filled and k not in keymap.recomputed]
    problems = [(label, items) for label, items in (("torch keys not paired", unaccounted),
                                                    ("paddle keys not filled", unfilled),
                                                    ("paddle keys filled twice", twice)) if items]
    if problems:
        raise MappingError("; ".join(f"{len(items)} {label} (e.g. {items[0]})" for label, items in problems)
                           + "; " + _hand_snippet(['keys = [["<torch key>", "<paddle key>"]]']),
                           [f"{label}: {', '.join(items[:6])}" for label, items in problems])


def resolve_aliases(keymap: KeyMap, torch_model, paddle_model, torch_keys: list, paddle_keys: list) -> None:
    """A module registered under two names (RegionViT's proj / proj_cls) is one unit, but its
    tensors appear under both names in the state dict: the second name follows the first."""
    t_alias = _aliases(torch_model.named_modules(remove_duplicate=False))
    p_alias = _aliases(_walk_paddle(paddle_model))
    for key in torch_keys:
        if key in keymap.pairs or key in keymap.drops:
            continue
        path, _, name = key.rpartition(".")
        canonical = t_alias.get(path)
        if canonical is None or _key(canonical, name) not in keymap.pairs:
            continue
        p_key = keymap.pairs[_key(canonical, name)]
        p_path, _, p_name = p_key.rpartition(".")
        others = [a for a, c in p_alias.items() if c == p_path and a != p_path]
        choice = next((a for a in others if a == path), others[0] if len(others) == 1 else None)
        if choice is not None and _key(choice, p_name) in paddle_keys:
            keymap.pairs[key] = _key(choice, p_name)
            if _key(canonical, name) in keymap.transposed:
                keymap.transposed.add(key)


def _aliases(named) -> dict:
    """alias path -> first path of the same module object, for modules with several names."""
    first: dict = {}
    aliases = {}
    for path, module in named:
        if id(module) in first and first[id(module)] != path:
            aliases[path] = first[id(module)]
        first.setdefault(id(module), path)
    return aliases


def _walk_paddle(layer, prefix: str = ""):
    yield prefix, layer
    for name, child in layer._sub_layers.items():
        if child is not None:
            yield from _walk_paddle(child, f"{prefix}.{name}" if prefix else name)



# --- the key mapping as rules -----------------------------------------------------------------

def compress(keymap: KeyMap) -> tuple:
    """Rules in the mapping-table vocabulary that reproduce ``keymap`` exactly: BatchNorm renames,
    module moves generalised over numbered components (``stages.{i}.downsample ->
    downsample_layers.{i}``) where that maps every key right both ways, Linear transposes and drops
    generalised the same way, recomputed buffers.  Checked against the key map before returning;
    where a generalisation would not hold, the exact per-module (at worst per-key) rules are used."""
    from mappings.rules import BATCHNORM

    bn = any(k.rpartition(".")[2] in ("running_mean", "running_var") for k in keymap.pairs) or any(
        k.endswith(STEP_COUNTER) for k in keymap.drops)
    renames = tuple(r for r in BATCHNORM if isinstance(r, Rename)) if bn else ()
    drops = _drop_rules(keymap, bn)
    transposes = tuple(Transpose(p) for p in _generalise_keys(set(keymap.transposed),
                                                               set(keymap.pairs) | set(keymap.splits)))
    splits = tuple(Split(t, tuple(p)) for t, p in keymap.splits.items())
    recompute = _recompute_rules(keymap)
    full, modules = _split_moves(keymap, renames)
    for moves in (_templated_moves(modules, keymap, full), _exact_moves(modules), None):
        if moves is None:  # last resort: one rule per key, always exact
            moves = [Move(t, p) for t, p in keymap.pairs.items() if t != p]
            rules = renames + tuple(moves) + transposes + drops + recompute + splits
        else:
            rules = renames + tuple(full) + tuple(moves) + transposes + drops + recompute + splits
        if reproduces(rules, keymap):
            return rules
    raise AssertionError("per-key rules always reproduce the key map")


def reproduces(rules: tuple, keymap: KeyMap) -> bool:
    """Whether ``rules`` send every torch key where the key map does, transpose exactly its Linear
    weights, and read every Paddle key back to its torch key."""
    from .engine import reverse_key, target_key

    transposes = [r for r in rules if isinstance(r, Transpose)]
    for t_key, p_key in keymap.pairs.items():
        if target_key(t_key, rules) != p_key or reverse_key(p_key, rules) != t_key:
            return False
        if any(r.matches(t_key) for r in transposes) != (t_key in keymap.transposed):
            return False
    for t_key in keymap.splits:
        if any(r.matches(t_key) for r in transposes) != (t_key in keymap.transposed):
            return False
    return all(target_key(t_key, rules) is None for t_key in keymap.drops)


def _split_moves(keymap: KeyMap, renames: tuple) -> tuple:
    """(full-key moves for tensors whose own name changes, {torch module: paddle module} for the rest)."""
    leaf_map = {r.old: r.new for r in renames}
    full, modules = [], {}
    for t_key, p_key in keymap.pairs.items():
        t_mod, _, t_leaf = t_key.rpartition(".")
        p_mod, _, p_leaf = p_key.rpartition(".")
        if leaf_map.get(t_leaf, t_leaf) != p_leaf or (t_mod != p_mod and "" in (t_mod, p_mod)):
            full.append(Move(t_key, p_key))  # the tensor's own name changes, or it leaves / enters the root
        else:
            modules[t_mod] = p_mod
    return full, modules


def _cover(modules: dict) -> list:
    """The fewest (torch prefix, paddle prefix) moves that send every module where it goes: a
    prefix whose modules all keep their path below it is one move (none when unchanged)."""
    def consistent(prefix: str) -> Optional[str]:
        if prefix == "":
            return "" if all(t == p for t, p in modules.items()) else None
        target = None
        for t, p in modules.items():
            if not _under(t, prefix):
                continue
            rest = t[len(prefix):]  # '' or '.sub.path'
            if not p.endswith(rest):
                return None
            base = p[: len(p) - len(rest)]
            if target is None:
                target = base
            elif target != base:
                return None
        return target

    def children(prefix: str) -> list:
        depth = prefix.count(".") + 1 if prefix else 0
        return sorted({".".join(t.split(".")[: depth + 1]) for t in modules
                       if t and _under(t, prefix) and t.count(".") + 1 > depth})

    def walk(prefix: str) -> list:
        target = consistent(prefix)
        if target is not None:
            return [] if target == prefix else [(prefix, target)]
        moves = [m for child in children(prefix) for m in walk(child)]
        if prefix and prefix in modules and modules[prefix] != prefix:
            own = modules[prefix]
            # its own tensors; deeper moves come first, and those the own move already makes go
            moves = [(c, q) for c, q in moves if q != own + c[len(prefix):]] + [(prefix, own)]
        return moves

    return walk("")


def _exact_moves(modules: dict) -> list:
    moves = _cover(modules)
    return [Move(t, p) for t, p in sorted(moves, key=lambda m: -m[0].count("."))]


def _templates(pattern: str, replacement: str) -> list:
    """Generalisations of one move: numbered components bound to ``{i}``, ``{j}`` ... where the
    same number appears on the other side."""
    p_parts, q_parts = pattern.split("."), replacement.split(".")
    numbered = [i for i, part in enumerate(p_parts) if NUMBER.match(part)]
    options = [[None] + [j for j, q in enumerate(q_parts) if q == p_parts[i]] for i in numbered]
    results = []

    def build(choice):
        used = [c for c in choice if c is not None]
        if len(used) != len(set(used)) or not used:
            return
        names = iter("ijklmnopq")
        p, q = list(p_parts), list(q_parts)
        for i, c in zip(numbered, choice):
            if c is not None:
                name = "{" + next(names) + "}"
                p[i], q[c] = name, name
        results.append((".".join(p), ".".join(q)))

    def product(k, choice):
        if k == len(options):
            build(choice)
            return
        for option in options[k]:
            product(k + 1, choice + [option])
    product(0, [])
    return results


def _templated_moves(modules: dict, keymap: KeyMap, full: list) -> list:
    """The cover's moves, generalised greedily: the template covering most moves first, taken only
    when every key it matches in either direction is its own (or a deeper move's) and comes out right."""
    cover = _cover(modules)
    depth = lambda path: path.count(".") + 1 if path else 0  # noqa: E731
    full_keys = {m.pattern for m in full}
    pairs = {t: p for t, p in keymap.pairs.items() if t not in full_keys}
    owner_t = {t: max((m for m in cover if _under(t, m[0])), key=lambda m: depth(m[0]), default=None) for t in pairs}
    remaining = list(cover)
    chosen = []
    while remaining:
        best, best_covered = None, []
        for template in sorted({tpl for m in remaining for tpl in _templates(*m)}):  # sorted: the same file every run
            move = Move(*template)
            covered = [m for m in remaining if move.forward(m[0]) == m[1] and depth(template[0]) == depth(m[0])]
            if len(covered) > len(best_covered) and _safe(move, pairs, owner_t, depth):
                best, best_covered = move, covered
        if best is None or len(best_covered) < 2:
            break
        chosen.append(best)
        remaining = [m for m in remaining if m not in best_covered]
    chosen += [Move(t, p) for t, p in remaining]
    return sorted(chosen, key=lambda m: -depth(m.pattern))


def _under(key: str, prefix: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def _safe(move: Move, pairs: dict, owner_t: dict, depth) -> bool:
    from .engine import renamed_key
    from mappings.rules import BATCHNORM

    leaf = tuple(r for r in BATCHNORM if isinstance(r, Rename))
    d = depth(move.pattern)
    for t_key, p_key in pairs.items():
        owner = owner_t.get(t_key)
        if owner is not None and depth(owner[0]) > d:
            continue  # a deeper move takes this key first
        forward = move.forward(t_key)
        if forward is not None and renamed_key(forward, leaf) != p_key:
            return False
        p_base = p_key
        for r in leaf:
            back = r.backward(p_base)
            if back is not None:
                p_base = back
                break
        backward = move.backward(p_base)
        if backward is not None and backward != t_key:
            return False
    return True


def _generalise_keys(keys: set, universe: set) -> list:
    """Regexes matching exactly ``keys`` among ``universe``: numbered components as ``\\d+`` where
    that catches no other key, else the key itself."""
    patterns, left = [], set(keys)
    groups: dict = {}
    for key in sorted(keys):
        general = r"\.".join(r"\d+" if NUMBER.match(p) else re.escape(p) for p in key.split("."))
        groups.setdefault(f"^{general}$", []).append(key)
    for pattern, members in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        regex = re.compile(pattern)
        if all(k in keys for k in universe if regex.search(k)):
            patterns.append(pattern)
            left -= set(members)
    patterns += [f"^{re.escape(k)}$" for k in sorted(left)]
    return sorted(patterns)


def _drop_rules(keymap: KeyMap, bn: bool) -> tuple:
    from mappings.rules import BATCHNORM

    rules = [r for r in BATCHNORM if isinstance(r, Drop)] if bn else []
    by_reason: dict = {}
    for key, reason in keymap.drops.items():
        if not key.endswith(STEP_COUNTER):
            by_reason.setdefault(reason, set()).add(key)
    universe = set(keymap.pairs) | set(keymap.drops)
    for reason, keys in by_reason.items():
        rules += [Drop(p, reason) for p in _generalise_keys(keys, universe)]
    return tuple(rules)


def _recompute_rules(keymap: KeyMap) -> tuple:
    by_reason: dict = {}
    for key, reason in keymap.recomputed.items():
        by_reason.setdefault(reason, set()).add(key)
    universe = set(keymap.pairs.values()) | set(keymap.recomputed)
    return tuple(Recompute(p, reason) for reason, keys in by_reason.items()
                 for p in _generalise_keys(keys, universe))
