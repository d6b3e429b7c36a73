"""diff: where a port goes wrong, not just that it does.

Both models run on the same batch with a forward hook on every pair of corresponding modules.
The pairing comes from the family's mapping table, not from guessing: each Paddle state-dict
key is read back to its official torch key (``reverse_key``), and the modules owning the two
keys — and their enclosing modules, level by level — are a pair.  Modules without weights
(activations, pooling, identities) pair when the same path names one in both models, since the
ports keep the reference's module paths.

Every paired call is compared in the order the torch modules finish (a module finishes after
the modules inside it), so the first layer whose output exceeds the tolerance is where the two
computations part: its own weights or code, or — when its input already differs — the code
that feeds it.

The tolerance is absolute for outputs up to magnitude 1 and relative above: a layer diverges
when its max abs error exceeds ``tol * max(1, max |torch output|)``.  Deep residual streams
reach magnitudes in the hundreds (BiFormer's stage 3: 164 on the seeded test checkpoint), where
float32 rounding alone puts ~1e-4 of absolute error between two correct implementations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import extras
from .checkpoint import atomic_write, check_output_path
from .engine import reverse_key, target_key
from .errors import UserError
from .verify import DEFAULT_MAX_ERR, Discrepancy, RunSetting, _Capture, _flatten, forward_both, prepare_run

DEFAULT_TOL = DEFAULT_MAX_ERR  # the same bound verify's gate puts on the logits


@dataclass
class LayerDiff:
    torch: str  # module path in the torch reference
    paddle: str  # module path in the Paddle model
    call: int  # 1 for a module's first call in the forward, 2 for its second, ...
    max_abs_err: Optional[float]  # None when the outputs cannot be compared (see note)
    mean_abs_err: Optional[float]
    scale: Optional[float] = None  # max |torch output|
    note: str = ""
    relative: bool = False  # judged relative to ``scale`` alone (gradients: magnitudes far below 1)

    def allowed(self, tol: float) -> float:
        """The largest max abs error within ``tol``: absolute up to magnitude 1, relative above
        (a gradient: relative to its own magnitude)."""
        return tol * (self.scale or 0.0) if self.relative else tol * max(1.0, self.scale or 0.0)

    def exceeds(self, tol: float) -> bool:
        # NaN counts as divergent: a NaN never compares <= anything.
        return self.max_abs_err is not None and not self.max_abs_err <= self.allowed(tol)

    @property
    def label(self) -> str:
        name = self.torch if self.paddle == self.torch else f"{self.torch} -> {self.paddle}"
        return name if self.call == 1 else f"{name} (call {self.call})"


@dataclass
class DiffReport(RunSetting):
    tol: float
    layers: list  # [LayerDiff] in torch execution order
    logits: Discrepancy
    unpaired: list = field(default_factory=list)  # torch modules holding weights that found no counterpart
    stage_names: tuple = ()  # the model's stage modules, for orientation in the plot
    backward: bool = False  # layers are output gradients in backward order; ``logits``: the input gradient

    def absorbed_by(self, i: int) -> Optional[LayerDiff]:
        """For a forward diff, the module enclosing layer ``i`` whose output, at the end of that
        enclosing call, agrees within --tol, if any: layer ``i``'s difference then does not reach the
        model.  E.g. BiFormer's KV gather, when a float tie of the router puts two selected regions in
        the other order: the gathered tensor differs, the attention over it does not."""
        if self.backward:
            return None
        inner = self.layers[i].torch
        for later in self.layers[i + 1:]:
            if inner.startswith(later.torch + "."):  # the next enclosing call to finish
                return later if later.max_abs_err is not None and not later.exceeds(self.tol) else None
        return None

    @property
    def first_divergent_index(self) -> Optional[int]:
        return next((i for i, layer in enumerate(self.layers)
                     if layer.exceeds(self.tol) and self.absorbed_by(i) is None), None)

    @property
    def first_divergent(self) -> Optional[LayerDiff]:
        i = self.first_divergent_index
        return None if i is None else self.layers[i]

    @property
    def absorbed(self) -> list:
        """The layers past --tol whose difference does not reach the module around them (``absorbed_by``)."""
        return [layer for i, layer in enumerate(self.layers) if layer.exceeds(self.tol) and self.absorbed_by(i)]

    @property
    def largest(self) -> Optional[LayerDiff]:
        absorbed = {id(layer) for layer in self.absorbed}
        compared = [layer for layer in self.layers if layer.max_abs_err is not None and id(layer) not in absorbed]
        return max(compared, key=lambda layer: layer.max_abs_err, default=None)

    def verdict(self) -> str:
        """One line: the first divergent layer and the layer before it, or why there is none."""
        i = self.first_divergent_index
        if i is None:
            largest = self.largest
            where = f"; largest layer error {largest.max_abs_err:.3e} at {largest.label}" if largest else ""
            absorbed = self.absorbed
            but = (f" but {', '.join(layer.label for layer in absorbed)}, whose difference does not reach the "
                   "module around it") if absorbed else ""
            return f"no layer diverges (every paired layer within --tol {self.tol:g}{but}{where})"
        layer = self.layers[i]
        text = (f"first divergent layer: {layer.label} (max abs err {layer.max_abs_err:.3e} > "
                f"{layer.allowed(self.tol):.3e}, --tol {self.tol:g} at output magnitude {layer.scale:.3g})")
        if i > 0:
            before = self.layers[i - 1]
            text += (f"; the layer before it, {before.label}, " + (
                f"could not be compared ({before.note})" if before.max_abs_err is None
                else f"is within tolerance ({before.max_abs_err:.3e})"))
        return text

    def format(self) -> str:
        first = self.first_divergent_index
        width = max([len(layer.label) for layer in self.layers] + [5])
        lines = [*self.header(8), (
            f"{len(self.layers)} paired layer output gradients in backward order: max abs error, mean abs error, "
            f"max |torch gradient|; '!' exceeds --tol {self.tol:g} x max |torch gradient|" if self.backward else
            f"{len(self.layers)} paired layer outputs in execution order: max abs error, mean abs error, "
            f"max |torch output|; '!' exceeds --tol {self.tol:g} x max(1, max |torch output|)")]
        for i, layer in enumerate(self.layers):
            if layer.max_abs_err is None:
                numbers = f"{'n/a':>10}  {'':>10}  {'':>9}  {layer.note}"
            else:
                flag = "!" if layer.exceeds(self.tol) else " "
                numbers = f"{layer.max_abs_err:10.3e}  {layer.mean_abs_err:10.3e}  {layer.scale:9.3g} {flag}"
                if i == first:
                    numbers += " <- first divergent"
                enclosing = self.absorbed_by(i) if layer.exceeds(self.tol) else None
                note = "; ".join(n for n in (layer.note, enclosing and f"does not reach {enclosing.label}, "
                                             "whose output agrees") if n)
                if note:
                    numbers += f"  ({note})"
            lines.append(f"  {i:4d}  {layer.label:<{width}}  {numbers}")
        if self.unpaired:
            lines.append(f"not paired ({len(self.unpaired)}): {', '.join(self.unpaired[:6])}"
                         + (" ..." if len(self.unpaired) > 6 else ""))
        lines.append(f"{'input gradient' if self.backward else 'logits'}  max abs {self.logits.max_abs_err:.3e}  "
                     f"mean abs {self.logits.mean_abs_err:.3e}")
        lines.append(self.verdict())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        first = self.first_divergent
        data = asdict(self)  # layers and logits become dicts too
        del data["stage_names"]
        for i, (layer, entry) in enumerate(zip(self.layers, data["layers"])):
            enclosing = self.absorbed_by(i) if layer.exceeds(self.tol) else None
            entry["absorbed_by"] = enclosing.torch if enclosing else None  # past --tol, not reaching it
        return {**data, "first_divergent_layer": first.torch if first else None,
                "first_divergent_call": first.call if first else None}


# --- pairing --------------------------------------------------------------------------------

def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _enclosing(path: str) -> list:
    """``path`` and every module enclosing it, innermost first (the root excluded)."""
    parts = path.split(".") if path else []
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def pair_modules_by_keys(torch_model, paddle_model, rules) -> tuple:
    """Pairing for two implementations that need not share a module tree (a pair file's): a torch
    module and a Paddle module are a pair when the mapping sends exactly the tensors under the one
    to exactly the tensors under the other (innermost first where several enclose the same set).
    Weightless modules are not paired: nothing ties a timm activation to a PaddleClas one."""
    from mappings.rules import Recompute, Split

    recomputed = [r for r in rules if isinstance(r, Recompute)]
    split = {r.source for r in rules if isinstance(r, Split)}  # one torch tensor in several modules: no pair
    torch_keys = {k: None if k in split else target_key(k, rules) for k in torch_model.state_dict()}
    paddle_keys = [k for k in paddle_model.state_dict() if not any(r.matches(k) for r in recomputed)]

    def by_content(paths, keys_under) -> dict:
        groups: dict = {}
        for path in paths:
            content = frozenset(keys_under(path))
            if content:
                groups.setdefault(content, []).append(path)
        return groups

    t_paths = [p for p, _ in torch_model.named_modules() if p]
    t_groups = by_content(t_paths, lambda m: (v for k, v in torch_keys.items() if v and _owner(k).startswith(m)
                                              and (_owner(k) == m or _owner(k)[len(m)] == ".")))
    p_groups = by_content([p for p, _ in paddle_model.named_sublayers()],
                          lambda m: (k for k in paddle_keys if _owner(k) == m or _owner(k).startswith(m + ".")))
    def deepest_first(paths):
        return sorted(paths, key=lambda p: -p.count("."))

    pairs = {}
    for content, t_list in t_groups.items():
        for t_path, p_path in zip(deepest_first(t_list), deepest_first(p_groups.get(content, []))):
            pairs[t_path] = p_path
    unpaired = [p for p in t_paths if p not in pairs and any(
        v for k, v in torch_keys.items() if _owner(k) == p)]
    order = {p: i for i, p in enumerate(t_paths)}
    return dict(sorted(pairs.items(), key=lambda item: order[item[0]])), unpaired


def pair_modules(torch_model, paddle_model, rules) -> tuple:
    """``({torch path: Paddle path}, [unpaired torch paths])``, in the torch model's module order.

    A Paddle state-dict key and the official key the mapping table reads it back to are the same
    tensor, so their owning modules are the same layer, and so are the modules enclosing those.
    Modules without weights pair by identical path.
    """
    torch_modules = dict(torch_model.named_modules())
    paddle_modules = dict(paddle_model.named_sublayers())
    torch_keys = set(torch_model.state_dict())
    by_table: dict = {}
    for paddle_key in paddle_model.state_dict():
        torch_key = reverse_key(paddle_key, rules)
        if torch_key not in torch_keys:
            continue  # the table does not account for this tensor: no evidence for a pairing
        for t_path, p_path in zip(_enclosing(_owner(torch_key)), _enclosing(_owner(paddle_key))):
            by_table.setdefault(t_path, p_path)
    pairs, unpaired = {}, []
    for path, module in torch_modules.items():
        if not path:
            continue  # the whole model: its output is the logits, reported on their own
        if path in by_table and by_table[path] in paddle_modules:
            pairs[path] = by_table[path]
        elif _has_state(module):
            unpaired.append(path)
        elif path in paddle_modules:
            pairs[path] = path
    return pairs, unpaired


def _has_state(torch_module) -> bool:
    return next(iter(torch_module.state_dict()), None) is not None


# --- comparison -----------------------------------------------------------------------------

def same_memory_layout(a: tuple, b: tuple) -> bool:
    """Whether shapes ``a`` and ``b`` hold the same number of values and differ only by merging
    adjacent axes or by size-1 axes, so that a reshape (never a transpose) maps one onto the other."""
    a, b = [d for d in a if d != 1], [d for d in b if d != 1]
    if int(np.prod(a)) != int(np.prod(b)):
        return False
    i = j = 0
    while i < len(a) and j < len(b):
        x, y = a[i], b[j]
        i, j = i + 1, j + 1
        if x < y:  # axes of ``a`` merge into one of ``b``'s
            while x < y and i < len(a):
                x, i = x * a[i], i + 1
        elif y < x:
            while y < x and j < len(b):
                y, j = y * b[j], j + 1
        if x != y:
            return False
    return i == len(a) and j == len(b)


def _fused_relu(expected: list, actual: list) -> bool:
    """The first output has negative values and the second none: a ReLU fused into the second."""
    floats = [(a, b) for a, b in zip(expected, actual) if a.size and a.dtype.kind == "f"]
    return bool(floats) and all(float(a.min()) < 0 <= float(b.min()) for a, b in floats)


def compare_outputs(expected: Optional[list], actual: list) -> dict:
    """max / mean abs error and max |torch output| over one call's output tensors, or a note
    saying why they cannot be compared."""
    if expected is None:
        return {"note": "the torch module made no such call"}
    t_shapes = [tuple(a.shape) for a in expected]
    p_shapes = [tuple(a.shape) for a in actual]
    if len(t_shapes) == len(p_shapes) and all(map(same_memory_layout, t_shapes, p_shapes)):
        # (N, H, W, C) against (N, H*W, C), (N, C, 1, 1) against (N, C): the same values in the
        # same order, as two implementations (a pair file's) may shape them.
        actual = [b.reshape(a.shape) for a, b in zip(expected, actual)]
        p_shapes = t_shapes
    if t_shapes != p_shapes:
        return {"note": f"outputs differ in structure: torch {t_shapes} vs paddle {p_shapes}"}
    relu_note = ""
    if _fused_relu(expected, actual):
        # PaddleClas's BatchNorm(act="relu") and the like end in the activation the torch model
        # runs as a module of its own: compare with the torch output after ReLU, and say so.
        expected = [np.maximum(a, 0) for a in expected]
        relu_note = "compared after ReLU: the Paddle layer applies the activation itself"
    elif _fused_relu(actual, expected):  # timm's BatchNormAct2d against a plain BatchNorm
        actual = [np.maximum(b, 0) for b in actual]
        relu_note = "compared after ReLU: the torch layer applies the activation itself"
    # Integer and boolean outputs are discrete choices (top-k indices, masks): an error size means
    # nothing there, so they are counted as differing elements instead.
    pairs = [(a, b) for a, b in zip(expected, actual) if a.size and a.dtype.kind == "f"]
    changed = sum(int(np.count_nonzero(a != b)) for a, b in zip(expected, actual) if a.dtype.kind != "f")
    note = f"{changed} integer/boolean output elements differ" if changed else ""
    note = "; ".join(n for n in (note, relu_note) if n)
    if not pairs:
        return {"note": note or "no floating-point output"}
    parts = [Discrepancy.between(a, b) for a, b in pairs]
    sizes = [a.size for a, _ in pairs]
    return {"max_abs_err": max(p.max_abs_err for p in parts),
            "mean_abs_err": float(sum(p.mean_abs_err * n for p, n in zip(parts, sizes)) / sum(sizes)),
            "scale": max(float(np.abs(a).max()) for a, _ in pairs), "note": note}


def layer_errors(torch_model, paddle_model, pairs: dict, batch: np.ndarray, device: str) -> tuple:
    """([LayerDiff] in torch execution order, logits Discrepancy).  Torch runs first and keeps
    its outputs; each Paddle output is compared the moment it exists, then both are let go."""
    torch_outputs: dict = {}  # (torch path, call) -> arrays, in execution order
    results: dict = {}  # (torch path, call) -> compare_outputs(...)
    torch_path = {p: t for t, p in pairs.items()}

    def keep(name, call, arrays):
        torch_outputs[(name, call)] = arrays

    def compare(name, call, arrays):
        key = (torch_path[name], call)
        results[key] = compare_outputs(torch_outputs.get(key), arrays)
        if key in torch_outputs:
            torch_outputs[key] = None  # compared: free the memory, keep the order

    t_cap = _Capture(torch_model, pairs, "torch", on_output=keep)
    p_cap = _Capture(paddle_model, list(pairs.values()), "paddle", on_output=compare)
    try:
        t_logits, p_logits, _, _ = forward_both(torch_model, paddle_model, batch, device)
    finally:
        t_cap.remove()
        p_cap.remove()
    layers = []
    for (name, call) in torch_outputs:
        found = results.get((name, call), {"note": "the Paddle module was not called"})
        layers.append(LayerDiff(name, pairs[name], call, found.get("max_abs_err"), found.get("mean_abs_err"),
                                found.get("scale"), found.get("note", "")))
    return layers, Discrepancy.between(t_logits, p_logits)


def layer_gradient_errors(torch_model, paddle_model, pairs: dict, batch: np.ndarray, device: str,
                          labels: np.ndarray) -> tuple:
    """([LayerDiff] in the order torch computes the gradients of the paired modules' outputs,
    Discrepancy of the input gradients).  Both models in train mode with stochastic ops at rate 0
    (as ``verify --train`` runs them), the same loss, one backward each; every paired module's
    output gets a gradient hook, call by call."""
    import paddle
    import torch

    from .train import _loss, zero_stochastic_ops

    grads = {"torch": {}, "paddle": {}}  # framework -> {(torch path, call): [arrays]}, arrival order
    order: list = []  # torch's arrival order of (path, call)
    torch_path = {p: t for t, p in pairs.items()}

    def forward_hook(framework, name, calls):
        def hook(module, inputs, output):
            calls[name] = call = calls.get(name, 0) + 1
            key = (name if framework == "torch" else torch_path[name], call)
            tensors = [o for o in _flatten(output) if _needs_grad(o, framework)]
            slots = grads[framework].setdefault(key, [None] * len(tensors))
            for i, tensor in enumerate(tensors):
                tensor.register_hook(_grad_recorder(slots, i, key, order if framework == "torch" else None))
        return hook

    handles, calls_t, calls_p = [], {}, {}
    t_modules = dict(torch_model.named_modules())
    p_modules = dict(paddle_model.named_sublayers())
    for t_name, p_name in pairs.items():
        handles.append(t_modules[t_name].register_forward_hook(forward_hook("torch", t_name, calls_t)))
        handles.append(p_modules[p_name].register_forward_post_hook(forward_hook("paddle", p_name, calls_p)))
    torch_model.train()
    paddle_model.train()
    zero_stochastic_ops(torch_model, "torch")
    zero_stochastic_ops(paddle_model, "paddle")
    try:
        t_in = torch.from_numpy(batch).to("cuda" if device == "gpu" else "cpu").requires_grad_(True)
        _loss(torch_model(t_in), torch.from_numpy(labels).to(t_in.device), "torch").backward()
        p_in = paddle.to_tensor(batch, stop_gradient=False)
        _loss(paddle_model(p_in), paddle.to_tensor(labels), "paddle").backward()
    finally:
        for h in handles:
            h.remove()
        torch_model.eval()
        paddle_model.eval()
    layers = []
    for key in order:
        name, call = key
        expected = grads["torch"].get(key)
        found = compare_outputs([g for g in expected if g is not None], [
            g for g in grads["paddle"].get(key, []) if g is not None]) if key in grads["paddle"] else {
            "note": "the Paddle module was not called"}
        layers.append(LayerDiff(name, pairs[name], call, found.get("max_abs_err"), found.get("mean_abs_err"),
                                found.get("scale"), found.get("note", ""), relative=True))
    return layers, Discrepancy.between(t_in.grad.cpu().numpy(), p_in.grad.numpy())


def _needs_grad(tensor, framework: str) -> bool:
    if framework == "torch":
        import torch

        return isinstance(tensor, torch.Tensor) and tensor.requires_grad and tensor.is_floating_point()
    import paddle

    return isinstance(tensor, paddle.Tensor) and not tensor.stop_gradient and tensor.dtype in (
        paddle.float32, paddle.float64, paddle.float16)


def _grad_recorder(slots: list, index: int, key, order):
    def record(grad):
        slots[index] = grad.detach().cpu().numpy().copy() if hasattr(grad, "cpu") else grad.numpy()
        if order is not None and key not in order:
            order.append(key)
    return record


def run_diff(name: str, torch_ckpt, paddle_params=None, *, tol: float = DEFAULT_TOL, images=None,
             batch_size: int = 2, input_size: Optional[int] = None, seed: int = 0, device: str = "cpu",
             ema: bool = False, key: Optional[str] = None, unsafe_pickle: bool = False,
             num_classes: int = 1000, backward: bool = False) -> DiffReport:
    """Layer-by-layer comparison of the torch reference and the Paddle model (same arguments as
    ``run_verify``; ``tol`` bounds each layer's max abs output error).  ``backward``: the gradients
    of the layer outputs instead, in backward order, each relative to its own magnitude."""
    prepared = prepare_run(name, torch_ckpt, paddle_params, images=images, batch_size=batch_size,
                           input_size=input_size, seed=seed, device=device, ema=ema, key=key,
                           unsafe_pickle=unsafe_pickle, num_classes=num_classes)
    torch_model, paddle_model = prepared.pair.torch_model, prepared.pair.paddle_model
    # Built-in ports keep the reference's module tree; a pair file's two models need not.
    pairing = pair_modules_by_keys if getattr(prepared.spec, "torch_ref", None) else pair_modules
    pairs, unpaired = pairing(torch_model, paddle_model, prepared.spec.rules)
    if backward:
        labels = np.random.default_rng(seed + 1).integers(0, num_classes, size=prepared.batch.shape[0])
        layers, logits = layer_gradient_errors(torch_model, paddle_model, pairs, prepared.batch,
                                               prepared.setting.device, labels)
    else:
        layers, logits = layer_errors(torch_model, paddle_model, pairs, prepared.batch, prepared.setting.device)
    return DiffReport(**asdict(prepared.setting), tol=tol, layers=layers, logits=logits, unpaired=unpaired,
                      stage_names=tuple(getattr(torch_model, "stage_names", ())), backward=backward)


# --- plot -----------------------------------------------------------------------------------

ZERO_FLOOR = 1e-12  # where an exact 0 is drawn on the log scale


def check_plot_path(path) -> Path:
    """A path ``plot_report`` can write to (matplotlib installed, a format it knows), or a UserError."""
    path = check_output_path(path, force=True)
    _require_matplotlib()
    from matplotlib.figure import Figure

    fmt = path.suffix.lstrip(".").lower()
    known = Figure().canvas.get_supported_filetypes()
    if fmt not in known:
        raise UserError(f"{path}: --plot writes an image; use a suffix matplotlib knows ({', '.join(sorted(known))})")
    return path


def _require_matplotlib() -> None:
    matplotlib = extras.require("matplotlib", "--plot", "plot")
    matplotlib.use("Agg")  # files only: never open a window


def plot_report(report: DiffReport, path) -> None:
    """Max abs error per layer (log scale) in execution order, the tolerance and the first
    divergent layer marked; written atomically in the format the suffix names (.png, .svg, ...)."""
    path = check_plot_path(path)
    from matplotlib.figure import Figure

    errors = [np.nan if layer.max_abs_err is None else max(layer.max_abs_err, ZERO_FLOOR)
              for layer in report.layers]
    fig = Figure(figsize=(12, 4.5), dpi=110)
    ax = fig.add_subplot()
    allowed = [layer.allowed(report.tol) for layer in report.layers]
    ax.plot(range(len(errors)), errors, ".-", lw=0.8, ms=3, label="max abs error of the layer's output")
    ax.step(range(len(allowed)), allowed, where="mid", color="tab:orange", ls="--", lw=1,
            label=f"tolerance: --tol {report.tol:g} x max(1, max |torch output|)")
    first = report.first_divergent_index
    if first is not None:
        ax.axvline(first, color="tab:red", lw=1)
        ax.plot([first], [errors[first]], "o", color="tab:red",
                label=f"first divergent: {report.layers[first].label}")
    ax.set_yscale("log")
    ticks = _stage_ticks(report.layers, report.stage_names)
    ax.set_xticks([i for i, _ in ticks], [label for _, label in ticks], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("paired layers in execution order (ticks: where each part of the model starts)")
    ax.set_ylabel(f"max abs error (0 drawn at {ZERO_FLOOR:g})")
    ax.set_title(f"{report.model}: torch vs Paddle, layer by layer")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".").lower()))


def _stage_ticks(layers: list, stage_names=()) -> list:
    """(index, label) of the first layer of each stage (or top-level module), leaving out any
    that would crowd the one before it."""
    ticks, seen = [], set()
    min_gap = len(layers) / 25
    for i, layer in enumerate(layers):
        part = next((s for s in stage_names if layer.torch == s or layer.torch.startswith(s + ".")),
                    layer.torch.split(".")[0])
        if part not in seen:
            seen.add(part)
            if not ticks or i - ticks[-1][0] >= min_gap:
                ticks.append((i, part))
    return ticks
