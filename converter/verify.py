"""verify: run the torch reference and the Paddle model on the same float32 batch and
measure how far apart they are — logits, per-stage features, top-1 agreement, time."""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .api import convert_checkpoint, create_paddle_model, create_torch_model, read_model_checkpoint
from .errors import UserError
from .preprocess import image_files, load_image, load_image_resized
from .registry import DENSE_VERIFY_SIZES, ModelSpec, get_spec

DEFAULT_MAX_ERR = 1e-4  # the gate on the max abs logit error (verify, verify --all, demo; diff's --tol)


@dataclass
class Discrepancy:
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float  # max |torch - paddle| / max |torch|

    @classmethod
    def between(cls, a, b) -> "Discrepancy":
        """Of two arrays, or of two lists of arrays (a dense backbone's feature maps) taken together."""
        if isinstance(a, list):
            if len(a) != len(b):
                raise UserError(f"torch returned {len(a)} outputs, Paddle {len(b)}")
            parts = [cls.between(x, y) for x, y in zip(a, b)]
            sizes = [x.size for x in a]
            return cls(max(p.max_abs_err for p in parts),
                       float(sum(p.mean_abs_err * n for p, n in zip(parts, sizes)) / sum(sizes)),
                       max(p.max_abs_err for p in parts) / (max(float(np.abs(x).max()) for x in a) or 1.0))
        if a.shape != b.shape:
            raise UserError(f"torch and Paddle outputs differ in shape: {a.shape} vs {b.shape}")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        scale = float(np.abs(a).max()) or 1.0
        return cls(float(diff.max()), float(diff.mean()), float(diff.max()) / scale)


@dataclass
class RunSetting:
    """What a comparison ran: the model, where each framework's weights came from, the batch
    (the first fields of verify's and diff's reports)."""
    model: str
    checkpoint_entry: str  # the container entry the torch weights came from
    paddle_params: str  # where the Paddle weights came from
    input: str
    batch_size: int
    input_size: object  # N for N x N, [H, W] otherwise (a dense backbone: every size it ran)
    device: str

    def header(self, label_width: int) -> list:
        """The report's first two lines: the model and where its weights came from, the batch."""
        sizes = self.input_size if isinstance(self.input_size, list) and isinstance(self.input_size[0], list) \
            else [self.input_size]
        return [model_line(label_width, self.model, self.checkpoint_entry, self.paddle_params),
                f"{'input':<{label_width}}{self.input}, batch {self.batch_size}, "
                f"{', '.join(map(size_label, sizes))}, {self.device} float32"]


def model_line(label_width: int, model: str, checkpoint_entry: str, paddle_params: str) -> str:
    """A report's first line (verify, diff, eval), its label padded to ``label_width``."""
    return f"{'model':<{label_width}}{model}  (torch entry '{checkpoint_entry}', paddle: {paddle_params})"


@dataclass
class VerifyReport(RunSetting):
    max_err: float
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float
    top1_agreement: Optional[float]  # None for a dense backbone (no classes)
    stages: list = field(default_factory=list)  # [{name, max_abs_err, mean_abs_err, max_rel_err}]
    routing: list = field(default_factory=list)  # [{module, rows, identical, ties, mismatches, max_gap}]
    torch_seconds: float = 0.0
    paddle_seconds: float = 0.0
    passed: bool = False
    # A dense backbone: every output map at every input size, judged relative to its scale:
    # [{size, stage, channels, stride, shape, max_abs_err, mean_abs_err, scale, max_rel_err}]
    features: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        if self.features:
            return self._format_dense()
        lines = self.header(16)
        for s in self.stages:
            lines.append(f"  {s['name']:<14}max {s['max_abs_err']:.3e}  mean {s['mean_abs_err']:.3e}")
        if self.routing:
            lines.append(self._routing_line())
        lines += [
            f"logits          max abs {self.max_abs_err:.3e}  mean abs {self.mean_abs_err:.3e}  "
            f"max rel {self.max_rel_err:.3e}",
            f"top-1 agreement {self.top1_agreement * 100:.1f}%",
            f"forward time    torch {self.torch_seconds:.3f} s, paddle {self.paddle_seconds:.3f} s",
            f"result          {'PASS' if self.passed else 'FAIL'} (max abs error "
            f"{self.max_abs_err:.3e} {'<=' if self.passed else '>'} {self.max_err:g})",
        ]
        return "\n".join(lines)

    def _format_dense(self) -> str:
        lines = self.header(16)
        for f in self.features:
            lines.append(f"  {f['size']:<9} stage {f['stage']} ({f['channels']} ch, /{f['stride']:<2}) "
                         f"max {f['max_abs_err']:.3e}  mean {f['mean_abs_err']:.3e}  "
                         f"|feature| {f['scale']:.3g}  rel {f['max_rel_err']:.2e}")
        if self.routing:
            lines.append(self._routing_line())
        worst = max(self.features, key=lambda f: f["max_abs_err"] / max(1.0, f["scale"]))
        lines += [
            f"forward time    torch {self.torch_seconds:.3f} s, paddle {self.paddle_seconds:.3f} s (all sizes)",
            f"result          {'PASS' if self.passed else 'FAIL'} (worst: {worst['size']} stage {worst['stage']}, "
            f"max abs error {worst['max_abs_err']:.3e} {'<=' if self.passed else '>'} "
            f"{self.max_err:g} x max(1, |feature| {worst['scale']:.3g}))",
        ]
        return "\n".join(lines)

    def _routing_line(self) -> str:
        total = sum(r["rows"] for r in self.routing)
        same = sum(r["identical"] for r in self.routing)
        ties = sum(r["ties"] for r in self.routing)
        line = (f"routing         {same}/{total} top-k rows identical across {len(self.routing)} routers, "
                f"{ties} float ties, {sum(r['mismatches'] for r in self.routing)} mismatches")
        first = next((r["module"] for r in self.routing if r["identical"] < r["rows"]), None)
        return line + (f"; first router to differ: {first} (later routers inherit its choice)" if first else "")


def resolve_device(device: str) -> str:
    """'cpu', or 'gpu' for both frameworks; 'auto' picks gpu only when both can use it."""
    if device != "cpu":
        # Full float32 on GPU: TF32 would put ~1e-3 relative error into every matmul and conv.
        # cuBLAS/cuDNN read this when their handles are created, so it is set before any CUDA
        # work; it covers both frameworks (Paddle has no Python switch of its own for TF32).
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    import paddle
    import torch

    if device == "auto":
        device = "gpu" if torch.cuda.is_available() and paddle.is_compiled_with_cuda() else "cpu"
    if device == "gpu":
        if not (torch.cuda.is_available() and paddle.is_compiled_with_cuda()):
            raise UserError("--device gpu needs CUDA in both torch and paddle (paddlepaddle-gpu); "
                            "use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    paddle.set_device(device)
    return device


def make_batch(spec: ModelSpec, *, images=None, batch_size: int = 2, input_size=None,
               seed: int = 0) -> tuple:
    """(NCHW float32 batch, description): real images through the official preprocessing,
    or a seeded standard-normal batch.  ``input_size``: N (N x N) or (H, W)."""
    h, w = checked_input_size(spec, input_size)
    if images is not None:
        files = image_files(images)[:batch_size]
        if spec.dense:
            batch = np.stack([load_image_resized(f, spec.preprocessing, (h, w)) for f in files])
            return batch, f"{len(files)} images from {images} (resized to {h}x{w}, bilinear)"
        if h != w:
            raise UserError("--images with a non-square --input-size: a classifier's eval crop is square")
        batch = np.stack([load_image(f, spec.preprocessing, h) for f in files])
        return batch, f"{len(files)} images from {images} ({spec.preprocessing.describe()})"
    return random_batch(batch_size, (h, w), seed), f"random normal batch (seed {seed})"


def as_hw(size) -> tuple:
    """N or (H, W) -> (H, W)."""
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def size_label(size) -> str:
    h, w = as_hw(size)
    return f"{h}x{w}"


def checked_input_size(spec: ModelSpec, input_size=None) -> tuple:
    """(H, W): ``input_size`` (N or (H, W)), or the model's official one, once the model is known
    to take it."""
    default = DENSE_VERIFY_SIZES[0] if spec.dense else spec.preprocessing.input_size
    h, w = as_hw(input_size or default)
    spec.check_input_size(h, w)
    return h, w


def random_batch(batch_size: int, size, seed: int) -> np.ndarray:
    """A seeded standard-normal NCHW float32 batch of ``size`` (N or (H, W)) images."""
    h, w = as_hw(size)
    return np.random.default_rng(seed).standard_normal((batch_size, 3, h, w), dtype=np.float32)


class _Capture:
    """Records the outputs of named sub-modules (forward hooks) in either framework.

    ``outputs[name]`` holds the tensors of a module's latest call, as numpy copies (a later
    in-place op cannot change them).  With ``on_output``, each call is handed over instead, as
    ``on_output(name, call, arrays)`` with ``call`` counting from 1 (a module can run more than
    once per forward), in the order the modules finish.
    """

    def __init__(self, model, names, framework: str, on_output=None):
        self.outputs: dict = {}
        self.handles = []
        self._calls: dict = {}
        self._on_output = on_output
        self._to_numpy = _torch_to_numpy if framework == "torch" else _paddle_to_numpy
        modules = dict(model.named_modules() if framework == "torch" else model.named_sublayers())
        for name in names:
            if name not in modules:
                raise UserError(f"model has no sub-module '{name}' to compare")
            hook = self._hook(name)
            module = modules[name]
            self.handles.append(module.register_forward_hook(hook) if framework == "torch"
                                else module.register_forward_post_hook(hook))

    def _hook(self, name):
        def record(module, inputs, output):
            arrays = [a for a in map(self._to_numpy, _flatten(output)) if a is not None]
            self._calls[name] = call = self._calls.get(name, 0) + 1
            if self._on_output is None:
                self.outputs[name] = arrays
            else:
                self._on_output(name, call, arrays)
        return record

    def remove(self):
        for h in self.handles:
            h.remove()


def _flatten(output) -> list:
    """The leaves of a module's output (tensors, or anything else) in order."""
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in _flatten(item)]
    if isinstance(output, dict):
        return [leaf for item in output.values() for leaf in _flatten(item)]
    return [output]


def _torch_to_numpy(value):
    import torch

    return value.detach().cpu().numpy().copy() if isinstance(value, torch.Tensor) else None


def _paddle_to_numpy(value):
    import paddle

    return value.detach().cpu().numpy() if isinstance(value, paddle.Tensor) else None  # numpy() copies


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_models(torch_model, paddle_model, batch: np.ndarray, device: str, stage_names=()) -> dict:
    """Forward both models on ``batch``; return logits, stage outputs and times."""
    t_cap = _Capture(torch_model, stage_names, "torch")
    p_cap = _Capture(paddle_model, stage_names, "paddle")
    try:
        t_out, p_out, t_sec, p_sec = forward_both(torch_model, paddle_model, batch, device)
    finally:
        t_cap.remove()
        p_cap.remove()
    return {"torch": t_out, "paddle": p_out, "torch_seconds": t_sec, "paddle_seconds": p_sec,
            "torch_stages": t_cap.outputs, "paddle_stages": p_cap.outputs}


def forward_both(torch_model, paddle_model, batch: np.ndarray, device: str, *, paddle_run=None) -> tuple:
    """(torch output, Paddle output, torch seconds, Paddle seconds) on ``batch``; torch runs first.
    An output is the logits array, or a dense backbone's list of feature-map arrays.
    ``paddle_run``: a function from the batch to the Paddle output that runs in place of
    ``paddle_model`` in dygraph (eval's Paddle Inference predictor)."""
    import torch

    t_in = torch.from_numpy(batch).to("cuda" if device == "gpu" else "cpu")
    with torch.no_grad():
        t_out, t_sec = _timed(lambda: _as_arrays(torch_model(t_in), lambda t: t.cpu().numpy()))
    p_out, p_sec = _timed(lambda: (paddle_run or functools.partial(paddle_forward, paddle_model))(batch))
    return t_out, p_out, t_sec, p_sec


def paddle_forward(paddle_model, batch: np.ndarray):
    """The dygraph model's output on ``batch`` (no autograd), as arrays."""
    import paddle

    with paddle.no_grad():
        return _as_arrays(paddle_model(paddle.to_tensor(batch)), lambda t: t.numpy())


def _as_arrays(output, to_numpy):
    return [to_numpy(t) for t in output] if isinstance(output, (list, tuple)) else to_numpy(output)


def routing_agreement(reference, other) -> dict:
    """Compare one router's captured outputs, ``(logits, index)`` per framework.

    logits (N, P, P), index (N, P, topk).  A row is one (sample, query region).  Rows whose
    selected region sets are equal (order aside: it does not change the attention) are identical.
    A differing row is a ``tie`` when every region selected by only one framework has a reference
    logit within twice that row's cross-framework logit error of the k-th largest reference logit
    (both selections are then a correct top-k within float error); otherwise a ``mismatch``.
    """
    ref_logits, ref_index = (np.asarray(a) for a in reference)
    logits, index = (np.asarray(a) for a in other)
    topk = ref_index.shape[-1]
    same = (np.sort(ref_index, -1) == np.sort(index, -1)).all(-1)
    ties, mismatches, max_gap = 0, 0, 0.0
    for row in zip(*np.nonzero(~same)):
        ref_row = ref_logits[row].astype(np.float64)
        allowed = 2 * np.abs(ref_row - logits[row]).max() + 1e-7 * max(1.0, np.abs(ref_row).max())
        kth = np.sort(ref_row)[-topk]
        swapped = np.setxor1d(ref_index[row], index[row])
        gap = float(np.abs(ref_row[swapped] - kth).max())
        max_gap = max(max_gap, gap)
        if gap <= allowed:
            ties += 1
        else:
            mismatches += 1
    return {"rows": int(same.size), "identical": int(same.sum()), "ties": ties, "mismatches": mismatches,
            "max_gap": max_gap}


def routing_report(torch_outputs: dict, paddle_outputs: dict, names) -> list:
    """Per router (modules returning ``(logits, top-k index)``, e.g. BiFormer's), how many
    routing rows agree; differing rows are split into float ties and real mismatches."""
    rows = []
    for name in names:
        if name in torch_outputs and name in paddle_outputs:
            rows.append({"module": name, **routing_agreement(torch_outputs[name], paddle_outputs[name])})
    return rows


def stage_discrepancies(torch_stages: dict, paddle_stages: dict, names) -> list:
    rows = []
    for name in names:
        pairs = list(zip(torch_stages.get(name, []), paddle_stages.get(name, [])))
        if not pairs:
            continue
        parts = [Discrepancy.between(a, b) for a, b in pairs]
        rows.append({"name": name, "max_abs_err": max(p.max_abs_err for p in parts),
                     "mean_abs_err": float(np.mean([p.mean_abs_err for p in parts])),
                     "max_rel_err": max(p.max_rel_err for p in parts)})
    return rows


@dataclass
class ModelPair:
    torch_model: object
    paddle_model: object
    checkpoint_entry: str  # the container entry the torch weights came from
    paddle_params: str  # where the Paddle weights came from


def load_model_pair(spec: ModelSpec, torch_ckpt, paddle_params=None, *, img_size: Optional[int] = None,
                    device: str = "cpu", ema: bool = False, key: Optional[str] = None,
                    unsafe_pickle: bool = False, num_classes: int = 1000) -> ModelPair:
    """The torch reference loaded from ``torch_ckpt`` and the Paddle model loaded from
    ``paddle_params`` (or converted in memory from the same checkpoint when None), both in eval
    mode on ``device`` (already resolved).  ``img_size`` matters only to size-dependent families
    (``ModelSpec.factory_kwargs`` passes it to no others)."""
    ckpt = read_model_checkpoint(spec, torch_ckpt, ema=ema, key=key, unsafe_pickle=unsafe_pickle)
    torch_model = create_torch_model(spec.name, ckpt, num_classes=num_classes, img_size=img_size)
    if device == "gpu":
        torch_model = torch_model.cuda()
    if paddle_params is None:
        params, _ = convert_checkpoint(spec, ckpt, num_classes=num_classes, img_size=img_size)
        params_label = "converted in memory"
    else:
        params, params_label = paddle_params, str(paddle_params)
    paddle_model = create_paddle_model(spec.name, params, num_classes=num_classes, img_size=img_size)
    return ModelPair(torch_model, paddle_model, ckpt.entry, params_label)


@dataclass
class PreparedRun:
    spec: ModelSpec
    batch: np.ndarray
    pair: ModelPair
    setting: RunSetting


def prepare_run(name: str, torch_ckpt, paddle_params=None, *, images=None, batch_size: int = 2,
                input_size=None, seed: int = 0, device: str = "cpu", ema: bool = False,
                key: Optional[str] = None, unsafe_pickle: bool = False, num_classes: int = 1000) -> PreparedRun:
    """The batch, and both models loaded for it: where verify and diff start."""
    spec = get_spec(name)
    batch, described = make_batch(spec, images=images, batch_size=batch_size, input_size=input_size, seed=seed)
    h, w = (int(n) for n in batch.shape[-2:])
    device = resolve_device(device)
    pair = load_model_pair(spec, torch_ckpt, paddle_params, img_size=h if h == w else None, device=device, ema=ema,
                           key=key, unsafe_pickle=unsafe_pickle, num_classes=num_classes)
    setting = RunSetting(spec.name, pair.checkpoint_entry, pair.paddle_params, described, int(batch.shape[0]),
                         h if h == w else [h, w], device)
    return PreparedRun(spec, batch, pair, setting)


def run_verify(name: str, torch_ckpt, paddle_params=None, *, images=None, batch_size: int = 2,
               input_size: Optional[int] = None, seed: int = 0, device: str = "cpu",
               max_err: float = DEFAULT_MAX_ERR, ema: bool = False, key: Optional[str] = None,
               unsafe_pickle: bool = False, num_classes: int = 1000) -> VerifyReport:
    """Compare the torch reference (loaded from ``torch_ckpt``) with the Paddle model (loaded from
    ``paddle_params``, or converted in memory from the same checkpoint when None)."""
    if get_spec(name).dense:
        return _verify_dense(name, torch_ckpt, paddle_params, images=images, batch_size=batch_size,
                             input_size=input_size, seed=seed, device=device, max_err=max_err, ema=ema, key=key,
                             unsafe_pickle=unsafe_pickle)
    prepared = prepare_run(name, torch_ckpt, paddle_params, images=images, batch_size=batch_size,
                           input_size=input_size, seed=seed, device=device, ema=ema, key=key,
                           unsafe_pickle=unsafe_pickle, num_classes=num_classes)
    pair, batch, device = prepared.pair, prepared.batch, prepared.setting.device
    stage_names = tuple(getattr(pair.torch_model, "stage_names", ()))
    router_names = tuple(getattr(pair.torch_model, "routing_modules", ()))
    run = run_models(pair.torch_model, pair.paddle_model, batch, device, stage_names + router_names)
    logits = Discrepancy.between(run["torch"], run["paddle"])
    agreement = float(np.mean(run["torch"].argmax(-1) == run["paddle"].argmax(-1)))
    return VerifyReport(
        **asdict(prepared.setting), max_err=max_err,
        max_abs_err=logits.max_abs_err, mean_abs_err=logits.mean_abs_err, max_rel_err=logits.max_rel_err,
        top1_agreement=agreement,
        stages=stage_discrepancies(run["torch_stages"], run["paddle_stages"], stage_names),
        routing=routing_report(run["torch_stages"], run["paddle_stages"], router_names),
        torch_seconds=run["torch_seconds"], paddle_seconds=run["paddle_seconds"],
        passed=bool(logits.max_abs_err <= max_err),
    )


def _verify_dense(name: str, torch_ckpt, paddle_params=None, *, images=None, batch_size: int = 2, input_size=None,
                  seed: int = 0, device: str = "cpu", max_err: float = DEFAULT_MAX_ERR, **checkpoint_options
                  ) -> VerifyReport:
    """A dense backbone: both models loaded once, then run at ``input_size`` or, by default, at
    DENSE_VERIFY_SIZES (non-square, padding in every family).  Every output map is compared; the
    gate is relative to each map's scale: max abs error <= max_err x max(1, max |torch feature|)."""
    spec = get_spec(name)
    sizes = [as_hw(input_size)] if input_size else list(DENSE_VERIFY_SIZES)
    for size in sizes:
        checked_input_size(spec, size)
    device = resolve_device(device)
    pair = load_model_pair(spec, torch_ckpt, paddle_params, device=device, **checkpoint_options)
    router_names = tuple(getattr(pair.torch_model, "routing_modules", ()))
    features, routing, t_total, p_total, described = [], [], 0.0, 0.0, ""
    for size in sizes:
        batch, described = make_batch(spec, images=images, batch_size=batch_size, input_size=size, seed=seed)
        run = run_models(pair.torch_model, pair.paddle_model, batch, device, router_names)
        t_total += run["torch_seconds"]
        p_total += run["paddle_seconds"]
        routing += routing_report(run["torch_stages"], run["paddle_stages"], router_names)
        features += feature_discrepancies(pair.torch_model.feature_info, run["torch"], run["paddle"], size)
    worst = max(f["max_abs_err"] for f in features)
    setting = RunSetting(spec.name, pair.checkpoint_entry, pair.paddle_params, described, batch_size,
                         [list(s) for s in sizes], device)
    return VerifyReport(
        **asdict(setting), max_err=max_err, max_abs_err=worst,
        mean_abs_err=float(np.mean([f["mean_abs_err"] for f in features])),
        max_rel_err=max(f["max_rel_err"] for f in features), top1_agreement=None, routing=routing,
        torch_seconds=t_total, paddle_seconds=p_total, features=features,
        passed=all(f["max_abs_err"] <= max_err * max(1.0, f["scale"]) for f in features))


def feature_discrepancies(feature_info, torch_maps, paddle_maps, size) -> list:
    """One row per output map: errors, and the map's own scale (max |torch feature|)."""
    if len(torch_maps) != len(paddle_maps):
        raise UserError(f"torch returned {len(torch_maps)} feature maps, Paddle {len(paddle_maps)}")
    rows = []
    for info, a, b in zip(feature_info, torch_maps, paddle_maps):
        d = Discrepancy.between(a, b)
        rows.append({"size": size_label(size), "stage": int(np.log2(info["stride"])) - 1,
                     "channels": info["channels"], "stride": info["stride"], "shape": list(a.shape),
                     "max_abs_err": d.max_abs_err, "mean_abs_err": d.mean_abs_err,
                     "scale": float(np.abs(a).max()), "max_rel_err": d.max_rel_err})
    return rows
