"""verify --train: do the two models *train* alike, not just infer alike?

Both models see the same batch in train mode (BatchNorm on batch statistics; every stochastic op
at rate 0, so the computation is deterministic), the same loss (cross-entropy on seeded labels;
a dense backbone: the mean of its squared feature maps), backward, then ``steps`` optimizer steps
with the same hyper-parameters.  Compared, through the mapping table that converted the weights:

- the loss of both at every step;
- every parameter's gradient after the first backward (a Linear weight's gradient transposed by
  the rule that transposed the weight), and the gradient of the input;
- every parameter after the last step;
- the BatchNorm running statistics after the first train-mode forward (one update from the same
  weights: the momentum and the unbiased-variance update are what is compared), gated, and after
  the last step (reported: by then the weights carry the optimizer's own float32 differences).

The torch reference also trains in float64, in lockstep (same batch, labels, optimizer), so every
figure stands next to the official computation's own float32 error: the loss per step, each
gradient, each weight after the steps.  A parameter passes when its gradient's error is within
``max_grad_err`` of its RMS *or* Paddle's gradient is as accurate as the reference's own float32
one: its distance from the float64 gradient within ACCURACY_FACTOR x the reference's float32
distance from it.  The second case is for gradients float32 cannot resolve: sums that are
mathematically zero and hold only rounding noise (a conv bias in front of a train-mode BatchNorm,
which subtracts it again; CrossFormer's ``pos3.2.bias``, a per-head constant that softmax ignores),
which no relative bound fits.  Weights after AdamW steps are reported, not gated: AdamW divides
each gradient element by its own magnitude, so an element whose gradient is rounding noise takes a
whole +-lr step in whichever direction the rounding points -- the reference's own float32 and
float64 runs part by 4e-3 to 1e-2 of a tensor's scale after three steps, and the report shows
that figure next to Paddle's.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .engine import reverse_key
from .errors import UserError
from .verify import RunSetting, prepare_run

OPTIMIZERS = ("sgd", "adamw")
# AdamW's official no-weight-decay set (timm create_optimizer in the four repos): every 1-D
# parameter (norm affines, biases, layer scales) and these tables.
NO_DECAY_NAMES = r"(pos_embed|rel_pos|relative_position|absolute_pos_embed)"
# Paddle's float32 rounding is independent of torch's and of the same size (median ratio of their
# errors against the exact gradient ~1; tails measured to 3.7x on ~500-parameter models, 5.2x on
# CrossFormer's zero-sum DPB biases): within 10x of torch's own error against the float64 gradient
# is "as accurate as the official float32 computation".  A wrong op is orders of magnitude off.
ACCURACY_FACTOR = 10.0
STATS_GATE = 1e-5  # running statistics after one update, relative to max(1, |torch value|)


@dataclass
class TrainReport(RunSetting):
    optimizer: str
    lr: float
    steps: int
    max_grad_err: float
    losses: list = field(default_factory=list)  # [{step, torch, paddle, rel_err}]
    max_loss_rel_err: float = 0.0
    max_rel_grad_err: float = 0.0  # worst parameter: max |g_t - g_p| / RMS(g_t)
    max_noise_ratio: Optional[float] = None  # worst max |g_t - g_p| / max |g_t(float32) - g_t(float64)|
    failed_grads: int = 0  # parameters outside both bounds
    worst_grads: list = field(default_factory=list)  # [{name, paddle, max_abs_err, rms, rel_err, noise, ...}]
    num_params: int = 0
    input_grad_rel_err: float = 0.0
    max_rel_weight_err: float = 0.0  # after the steps, relative to each parameter's max |value|
    reference_weight_err: float = 0.0  # the same measure, torch float32 vs torch float64
    worst_weights: list = field(default_factory=list)
    running_stats_err: Optional[float] = None  # after the first forward; None: no BatchNorm
    running_stats_final_err: Optional[float] = None  # after the last step
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def failures(self) -> list:
        """What failed the gate, one phrase each (empty when it passed)."""
        out = []
        if self.failed_grads:
            out.append(f"{self.failed_grads} parameter gradient(s) differ by more than --max-grad-err "
                       f"{self.max_grad_err:g} of their RMS and are less accurate than {ACCURACY_FACTOR:g}x "
                       f"the reference's own float32 gradients")
        if self.running_stats_err is not None and self.running_stats_err > STATS_GATE:
            out.append(f"BatchNorm running statistics differ by {self.running_stats_err:.2e} of max(1, |value|) "
                       f"after one update (gate {STATS_GATE:g})")
        return out

    def format(self) -> str:
        lines = self.header(18)
        lines.append(f"{'optimizer':<18}{self.optimizer}, lr {self.lr:g}, {self.steps} step(s)")
        for row in self.losses:
            lines.append(f"  step {row['step']:<3} loss torch {row['torch']:.7f}  paddle {row['paddle']:.7f}  "
                         f"rel {row['rel_err']:.2e}  (torch float32 vs float64: {row['reference_rel_err']:.2e})")
        noise = "" if self.max_noise_ratio is None else f", {self.max_noise_ratio:.1f}x the reference's own float32 error"
        lines.append(f"{'gradients':<18}{self.num_params} parameters: worst {self.max_rel_grad_err:.2e} of its RMS"
                     f"{noise}; input gradient {self.input_grad_rel_err:.2e} of its RMS")
        for g in self.worst_grads[:5]:
            lines.append(f"  {g['name']:<46} max {g['max_abs_err']:.2e}  rms {g['rms']:.2e}  rel {g['rel_err']:.2e}"
                         f"  float32 noise {g['noise']:.2e}")
        lines.append(f"{'weights after':<18}worst {self.max_rel_weight_err:.2e} relative"
                     + (f" ({self.worst_weights[0]['name']})" if self.worst_weights else "")
                     + f"; torch float32 vs float64: {self.reference_weight_err:.2e}")
        if self.running_stats_err is not None:
            lines.append(f"{'running stats':<18}after one update {self.running_stats_err:.2e} of max(1, |value|) "
                         f"(gate {STATS_GATE:g}); after the last step {self.running_stats_final_err:.2e}")
        lines.append(f"{'result':<18}{'PASS' if self.passed else 'FAIL'} ({self.failed_grads} of {self.num_params} "
                     f"gradients off by more than {self.max_grad_err:g} of their RMS and less accurate than "
                     f"{ACCURACY_FACTOR:g}x the reference's own float32 gradient"
                     + ("" if self.running_stats_err is None else
                        f"; running statistics {'within' if self.running_stats_err <= STATS_GATE else 'beyond'} the gate")
                     + ")")
        return "\n".join(lines)


def zero_stochastic_ops(model, framework: str) -> int:
    """Set every dropout (``p``) and drop-path (``drop_prob``) module to rate 0, so that train mode
    is deterministic and both frameworks compute the same thing; returns how many were set."""
    modules = model.modules() if framework == "torch" else model.sublayers(include_self=True)
    count = 0
    for module in modules:
        for attr in ("p", "drop_prob"):
            if isinstance(getattr(module, attr, None), float) and "drop" in type(module).__name__.lower():
                setattr(module, attr, 0.0)
                count += 1
    return count


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64))))) if a.size else 0.0


def parameter_pairs(torch_model, paddle_model, rules) -> list:
    """[(torch name, torch param, Paddle name, Paddle param, transposed)] for every Paddle parameter,
    read back to its official name by the mapping table."""
    from mappings.rules import Transpose

    transposes = [r for r in rules if isinstance(r, Transpose)]
    torch_params = dict(torch_model.named_parameters(remove_duplicate=False))
    pairs = []
    for p_name, p_param in paddle_model.named_parameters():
        if p_param.stop_gradient:
            continue  # BatchNorm running statistics: not trained
        t_name = reverse_key(p_name, rules)
        if t_name not in torch_params:
            raise UserError(f"Paddle parameter {p_name} has no torch counterpart ({t_name})")
        pairs.append((t_name, torch_params[t_name], p_name, p_param, any(t.matches(t_name) for t in transposes)))
    return pairs


def _loss(outputs, labels, framework: str):
    """Cross-entropy on the logits; a dense backbone's list of maps: the mean of squared features."""
    if framework == "torch":
        import torch.nn.functional as F

        if isinstance(outputs, (list, tuple)):
            return sum((o * o).mean() for o in outputs) / len(outputs)
        return F.cross_entropy(outputs, labels)
    import paddle.nn.functional as F

    if isinstance(outputs, (list, tuple)):
        return sum((o * o).mean() for o in outputs) / len(outputs)
    return F.cross_entropy(outputs, labels)


def no_weight_decay(name: str, shape) -> bool:
    return len(shape) <= 1 or re.search(NO_DECAY_NAMES, name) is not None


def torch_optimizer(kind: str, named: list, lr: float, momentum: float, weight_decay: float):
    """torch's side of ``make_optimizers`` over ``[(official name, parameter)]``: SGD with momentum,
    or AdamW with the official no-decay set as a param group."""
    import torch

    if kind == "sgd":
        return torch.optim.SGD([t for _, t in named], lr=lr, momentum=momentum)
    decay = [t for name, t in named if not no_weight_decay(name, t.shape)]
    no_decay = [t for name, t in named if no_weight_decay(name, t.shape)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-8)


def make_optimizers(kind: str, pairs: list, lr: float, momentum: float, weight_decay: float):
    """The same optimizer in both frameworks.  sgd: heavy-ball momentum, no weight decay (torch SGD,
    Paddle Momentum: v = mu v + g, p -= lr v).  adamw: decoupled weight decay on all but the
    official no-decay set -- a torch param group, a Paddle ``apply_decay_param_fun`` by name."""
    import paddle

    t_opt = torch_optimizer(kind, [(name, t) for name, t, _, _, _ in pairs], lr, momentum, weight_decay)
    p_params = [p for _, _, _, p, _ in pairs]
    if kind == "sgd":
        return t_opt, paddle.optimizer.Momentum(learning_rate=lr, momentum=momentum, parameters=p_params)
    decayed_names = {p.name for name, t, _, p, _ in pairs if not no_weight_decay(name, t.shape)}
    return t_opt, paddle.optimizer.AdamW(learning_rate=lr, parameters=p_params, weight_decay=weight_decay,
                                         epsilon=1e-8, apply_decay_param_fun=lambda n: n in decayed_names)


def _as_torch_layout(array: np.ndarray, transposed: bool) -> np.ndarray:
    return array.T if transposed else array


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else float("inf"))


def compare_gradients(pairs: list, reference64: dict, max_grad_err: float) -> list:
    """One row per parameter, worst first: max abs error, the torch gradient's RMS, the error
    relative to it, the reference's own float32 noise (max |float32 - float64|), Paddle's own
    distance from the float64 gradient in units of that noise, and whether it passes either bound."""
    rows = []
    for t_name, t_param, p_name, p_param, transposed in pairs:
        g_t = t_param.grad.detach().cpu().numpy() if t_param.grad is not None else np.zeros(tuple(t_param.shape))
        g_p = _as_torch_layout(p_param.grad.numpy(), transposed) if p_param.grad is not None else np.zeros_like(g_t)
        g_64 = reference64.get(t_name, g_t.astype(np.float64))
        err = float(np.abs(g_t.astype(np.float64) - g_p).max()) if g_t.size else 0.0
        noise = float(np.abs(g_t - g_64).max()) if g_t.size else 0.0
        accuracy = float(np.abs(g_p - g_64).max()) if g_t.size else 0.0  # Paddle's own error
        rms = _rms(g_t)
        rel = err / rms if rms > 0 else (0.0 if err == 0 else float("inf"))
        rows.append({"name": t_name, "paddle": p_name, "max_abs_err": err, "rms": rms, "rel_err": rel,
                     "noise": noise, "noise_ratio": _ratio(err, noise), "accuracy_ratio": _ratio(accuracy, noise),
                     "passed": rel <= max_grad_err or accuracy <= ACCURACY_FACTOR * noise})
    return sorted(rows, key=lambda r: (r["passed"], -r["rel_err"]))


class Float64Reference:
    """The torch reference trained in float64 alongside the float32 one: a copy taken before the
    first step (weights and BatchNorm statistics), the same optimizer, the same batch and labels."""

    def __init__(self, torch_model, kind: str, names: list, lr: float, momentum: float, weight_decay: float):
        import copy

        self.model = copy.deepcopy(torch_model).cpu().double().train()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self.optimizer = torch_optimizer(kind, [(n, params[n]) for n in names], lr, momentum, weight_decay)
        self.params = params

    def forward_backward(self, batch: np.ndarray, labels: np.ndarray) -> float:
        import torch

        loss = _loss(self.model(torch.from_numpy(batch.astype(np.float64))), torch.from_numpy(labels), "torch")
        loss.backward()
        return float(loss.detach())

    def gradients(self) -> dict:
        return {n: p.grad.numpy() for n, p in self.params.items() if p.grad is not None}

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def weights(self) -> dict:
        return {n: p.detach().numpy() for n, p in self.params.items()}


def compare_weights(pairs: list, reference64: dict) -> list:
    """One row per parameter, worst first: Paddle vs torch float32, max abs and relative to the
    tensor's max |value|; and the same relative measure for torch float32 vs float64."""
    rows = []
    for t_name, t_param, p_name, p_param, transposed in pairs:
        w_t = t_param.detach().cpu().numpy().astype(np.float64)
        if not w_t.size:
            continue
        w_p = _as_torch_layout(p_param.numpy(), transposed)
        scale = max(float(np.abs(w_t).max()), 1e-12)
        err = float(np.abs(w_t - w_p).max())
        rows.append({"name": t_name, "paddle": p_name, "max_abs_err": err, "rel_err": err / scale,
                     "reference_rel_err": float(np.abs(w_t - reference64[t_name]).max()) / scale})
    return sorted(rows, key=lambda r: -r["rel_err"])


def running_stats_error(torch_model, paddle_model) -> Optional[float]:
    """Worst difference of any BatchNorm running mean / variance element, relative to
    max(1, |torch value|) (a variance can be large); None when there is no BatchNorm."""
    t_state = torch_model.state_dict()
    p_state = paddle_model.state_dict()
    errors = []
    for key, value in t_state.items():
        module, _, leaf = key.rpartition(".")
        paddle_leaf = {"running_mean": "_mean", "running_var": "_variance"}.get(leaf)
        if paddle_leaf is None:
            continue
        other = p_state[f"{module}.{paddle_leaf}"].numpy()
        reference = value.cpu().numpy().astype(np.float64)
        errors.append(float((np.abs(reference - other) / np.maximum(1.0, np.abs(reference))).max()))
    return max(errors) if errors else None


def run_train_verify(name: str, torch_ckpt, paddle_params=None, *, steps: int = 1, optimizer: str = "sgd",
                     lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.05, batch_size: int = 2,
                     input_size=None, seed: int = 0, device: str = "cpu", max_grad_err: float = 1e-4,
                     ema: bool = False, key: Optional[str] = None, unsafe_pickle: bool = False,
                     num_classes: int = 1000) -> TrainReport:
    """Train both models ``steps`` steps on the same batch and compare loss, gradients, weights and
    running statistics (see the module docstring)."""
    import paddle
    import torch

    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {optimizer}: choose one of {', '.join(OPTIMIZERS)}")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    prepared = prepare_run(name, torch_ckpt, paddle_params, batch_size=batch_size, input_size=input_size,
                           seed=seed, device=device, ema=ema, key=key, unsafe_pickle=unsafe_pickle,
                           num_classes=num_classes)
    t_model, p_model = prepared.pair.torch_model, prepared.pair.paddle_model
    t_model.train()
    p_model.train()
    zero_stochastic_ops(t_model, "torch")
    zero_stochastic_ops(p_model, "paddle")
    pairs = parameter_pairs(t_model, p_model, prepared.spec.rules)
    t_opt, p_opt = make_optimizers(optimizer, pairs, lr, momentum, weight_decay)
    labels = np.random.default_rng(seed + 1).integers(0, num_classes, size=batch_size)
    report = TrainReport(**asdict(prepared.setting), optimizer=optimizer, lr=lr, steps=steps,
                         max_grad_err=max_grad_err, num_params=len(pairs))
    torch_device = "cuda" if prepared.setting.device == "gpu" else "cpu"
    reference64 = Float64Reference(t_model, optimizer, [t for t, *_ in pairs], lr, momentum, weight_decay)
    for step in range(1, steps + 1):
        r_value = reference64.forward_backward(prepared.batch, labels)
        t_in = torch.from_numpy(prepared.batch).to(torch_device).requires_grad_(True)
        p_in = paddle.to_tensor(prepared.batch, stop_gradient=False)
        t_loss = _loss(t_model(t_in), torch.from_numpy(labels).to(torch_device), "torch")
        p_loss = _loss(p_model(p_in), paddle.to_tensor(labels), "paddle")
        t_loss.backward()
        p_loss.backward()
        t_value, p_value = float(t_loss.detach()), float(p_loss)
        report.losses.append({"step": step, "torch": t_value, "paddle": p_value, "float64": r_value,
                              "rel_err": abs(t_value - p_value) / max(abs(t_value), 1e-12),
                              "reference_rel_err": abs(t_value - r_value) / max(abs(r_value), 1e-12)})
        if step == 1:
            grads = compare_gradients(pairs, reference64.gradients(), max_grad_err)
            report.worst_grads = grads[:20]
            report.max_rel_grad_err = max((g["rel_err"] for g in grads), default=0.0)
            report.max_noise_ratio = max((g["noise_ratio"] for g in grads), default=0.0)
            report.failed_grads = sum(not g["passed"] for g in grads)
            g_in = t_in.grad.cpu().numpy()
            report.input_grad_rel_err = float(np.abs(g_in - p_in.grad.numpy()).max()) / max(_rms(g_in), 1e-30)
            report.running_stats_err = running_stats_error(t_model, p_model)
        t_opt.step()
        p_opt.step()
        reference64.step()
        t_opt.zero_grad()
        p_opt.clear_grad()
    weights = compare_weights(pairs, reference64.weights())
    report.worst_weights = weights[:20]
    report.max_rel_weight_err = weights[0]["rel_err"] if weights else 0.0
    report.reference_weight_err = max((w["reference_rel_err"] for w in weights), default=0.0)
    report.max_loss_rel_err = max(r["rel_err"] for r in report.losses)
    report.running_stats_final_err = running_stats_error(t_model, p_model)
    report.passed = report.failed_grads == 0 and (report.running_stats_err is None
                                                  or report.running_stats_err <= STATS_GATE)
    return report
