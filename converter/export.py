"""export: the converted model as a static Paddle inference model, checked before it is kept.

``paddle.jit.save`` traces the Paddle model into a static graph (``inference.json`` +
``inference.pdiparams``, what Paddle Inference and ``paddle.jit.load`` read).  The export is then
reloaded by ``paddle.jit.load`` and by Paddle Inference, and run on a seeded batch: its logits
must equal the dynamic model's within ``max_err`` times the logits' magnitude where that
exceeds 1 (``max_err * max(1, max |logit|)``).  With a dynamic batch the check also runs a
second batch size, so a batch size baked into the graph cannot pass.  Paddle Inference is
checked in the three CPU configurations a deployment may use (``ONEDNN``): oneDNN on (its
default), off, and on for the fused ops only (``export.json`` recommends it: the fastest).  With
oneDNN on, graph passes fuse ops and oneDNN kernels replace Paddle's; paddle_models/onednn.py
lists the patterns that break under Paddle 3.3.1, which the ports avoid.  What remains is
float32 rounding of a different summation order, ~1e-6 of the logits' magnitude: 1.1e-5 on
logits of 10 (crossformer_tiny, head scaled up), hence the gate scales with it.  paddle.jit.load
and oneDNN off reproduce the dynamic model exactly or within 1e-6.

Everything is written to a temporary directory beside OUT_DIR and moved into place only after
the check passes: a failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .api import create_paddle_model
from .errors import UserError
from .registry import ModelSpec, get_spec
from .verify import Discrepancy, checked_input_size, random_batch

PREFIX = "inference"  # inference.json / inference.pdiparams, the name Paddle's deployment tools expect
METADATA = "export.json"
DEFAULT_MAX_ERR = 1e-5
# The Paddle Inference CPU configurations checked, by how much of the graph oneDNN runs: none
# ("off"); every op it has a kernel for ("on", Paddle Inference's CPU default); or only the ops its
# fuse passes make — convolutions, fc and matmuls with what they absorb ("fused": the placement pass
# that moves every other op onto oneDNN deleted, so reshapes stay views instead of oneDNN copies and
# small ops skip oneDNN's per-op cost; the fastest of the three, see the README's Benchmarks).
ONEDNN = ("off", "on", "fused")
TIMED_RUNS = 3  # per checked runtime and batch, after its check run
_ONEDNN_NAMES = {"off": "oneDNN off", "on": "oneDNN on", "fused": "oneDNN fused ops only"}
_PLACEMENT_PASS = "onednn_placement_pass"


def inference_runtime(onednn: str, threads: Optional[int] = None) -> str:
    """How reports name Paddle Inference on CPU: its oneDNN configuration, and its math threads if set."""
    count = f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    return f"Paddle Inference (CPU, {_ONEDNN_NAMES[onednn]}{count})"


RUNTIMES = ("paddle.jit.load",) + tuple(inference_runtime(mode) for mode in ONEDNN)


def configure_cpu(config, onednn: str) -> None:
    """Set ``config`` (a ``paddle.inference.Config``) to the CPU configuration ``onednn`` names."""
    config.disable_gpu()
    if onednn == "off":
        config.disable_mkldnn()
        return
    config.enable_mkldnn()
    if onednn == "fused":
        config.delete_pass(_PLACEMENT_PASS)


def config_recipe(onednn: str) -> dict:
    """The calls that make a ``paddle.inference.Config`` run as ``onednn``, for export.json."""
    calls = ["disable_gpu()", "disable_mkldnn()" if onednn == "off" else "enable_mkldnn()"]
    if onednn == "fused":
        calls.append(f'delete_pass("{_PLACEMENT_PASS}")')
    return {"runtime": inference_runtime(onednn), "config_calls": calls}


def gate(max_err: float, max_abs_logit: float) -> float:
    """The tolerance on an export's max abs logit error: ``max_err``, times the dynamic model's
    largest |logit| where that exceeds 1."""
    return max_err * max(1.0, max_abs_logit)


@dataclass
class ExportReport:
    model: str
    out_dir: str
    input_spec: list  # [batch or None, 3, H, W]
    max_err: float
    # [{runtime, batch_size, max_abs_err, mean_abs_err, max_abs_logit (the dynamic model's), median_ms (timed)}]
    checks: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def max_abs_err(self) -> float:
        return max(c["max_abs_err"] for c in self.checks)

    def tolerance(self, check: dict) -> float:
        """The gate of one check: ``max_err``, times the dynamic model's largest |logit| above 1."""
        return gate(self.max_err, check["max_abs_logit"])

    @property
    def worst(self) -> dict:
        """The check furthest over (or least under) its gate."""
        return max(self.checks, key=lambda c: c["max_abs_err"] - self.tolerance(c))

    @property
    def largest_batch_times(self) -> tuple:
        """(the largest checked batch size, {runtime: median ms} at it)."""
        batch = max(c["batch_size"] for c in self.checks)
        return batch, {c["runtime"]: c["median_ms"] for c in self.checks if c["batch_size"] == batch}

    @property
    def fastest_inference(self) -> str:
        """The oneDNN configuration (ONEDNN) of the Paddle Inference runtime that ran the largest
        checked batch fastest."""
        _, times = self.largest_batch_times
        return min(ONEDNN, key=lambda mode: times[inference_runtime(mode)])

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c["max_abs_err"] <= self.tolerance(c) for c in self.checks)

    def format(self) -> str:
        batch = "dynamic batch" if self.input_spec[0] is None else f"fixed batch {self.input_spec[0]}"
        lines = [f"model      {self.model}",
                 f"input      image float32 {self.input_spec} ({batch})"]
        for c in self.checks:
            timed = f"  {c['median_ms']:.1f} ms" if "median_ms" in c else ""  # checks built elsewhere may be untimed
            lines.append(f"  {c['runtime']:<46} batch {c['batch_size']}: max abs {c['max_abs_err']:.3e}  "
                         f"mean abs {c['mean_abs_err']:.3e}  (gate {self.tolerance(c):.1e}){timed}")
        verdict = "PASS" if self.passed else "FAIL"
        w = self.worst
        lines.append(f"result     {verdict} (worst: {w['runtime']}, batch {w['batch_size']}: max abs error "
                     f"{w['max_abs_err']:.3e} {'<=' if self.passed else '>'} {self.tolerance(w):.3e} = max_err "
                     f"{self.max_err:g} x max(1, max |logit| {w['max_abs_logit']:.3g}))")
        if self.passed:
            lines.append(f"deploy     {inference_runtime(self.fastest_inference)}: the fastest here "
                         f"(export.json says how to set it up)")
            lines.append(f"written    {self.out_dir}/ ({', '.join(self.files)})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "max_abs_err": self.max_abs_err}


def check_out_dir(out_dir, force: bool) -> Path:
    """OUT_DIR may be new or empty; --force replaces an earlier export, never another directory."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / METADATA).is_file():
            raise UserError(f"{out_dir}: already exists and holds something other than an export; "
                            f"choose a new or empty directory")
        if not force:
            raise UserError(f"{out_dir}: already holds an export; pass --force to replace it")
    if not out_dir.parent.is_dir():
        raise UserError(f"{out_dir.parent}: output directory does not exist")
    return out_dir


def export_model(name: str, params, out_dir, *, batch_size: Optional[int] = None,
                 input_size: Optional[int] = None, max_err: float = DEFAULT_MAX_ERR, seed: int = 0,
                 num_classes: int = 1000, force: bool = False) -> ExportReport:
    """Export ``name`` with weights ``params`` (a .pdparams path or state dict) to ``out_dir``.

    ``batch_size`` None exports a dynamic batch dimension.  Returns the report; ``out_dir`` is
    written only when every check passed.  Raises UserError when the model cannot be traced."""
    import paddle

    spec = get_spec(name)
    if spec.dense:
        raise UserError(f"{spec.name} is a dense backbone: export the PaddleDetection / PaddleSeg model built "
                        f"around it (paddle_models.paddledet_backbones / paddleseg_backbones); "
                        f"export takes classification models")
    size, _ = checked_input_size(spec, input_size)  # square: the classifiers are built for one size
    out_dir = check_out_dir(out_dir, force)
    paddle.set_device("cpu")
    model = create_paddle_model(spec.name, params, num_classes=num_classes, img_size=size)
    input_spec = [batch_size, 3, size, size]
    report = ExportReport(spec.name, str(out_dir), input_spec, max_err)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _save_static(spec, model, staging / PREFIX, input_spec)
        batches = [random_batch(n, size, seed) for n in _check_batch_sizes(batch_size)]
        report.checks = _check_runtimes(model, staging / PREFIX, batches)
        _write_metadata(staging, spec, report)
        report.files = sorted(p.name for p in staging.iterdir())
        if report.passed:
            _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _check_batch_sizes(batch_size: Optional[int]) -> tuple:
    # Dynamic: two different sizes, so a batch dimension frozen into the graph shows up.
    return (2, 1) if batch_size is None else (batch_size,)


def trace_for_inference(spec: ModelSpec, model, directory: Path, input_size: int) -> Path:
    """``model`` traced with a dynamic batch of ``input_size`` images into ``directory``: the path
    prefix ``inference_runner`` loads.  UserError (one line) when tracing fails."""
    path_prefix = Path(directory) / PREFIX
    _save_static(spec, model, path_prefix, [None, 3, input_size, input_size])
    return path_prefix


def _save_static(spec: ModelSpec, model, path_prefix: Path, input_spec: list) -> None:
    import paddle

    spec_in = [paddle.static.InputSpec(list(input_spec), "float32", "image")]  # InputSpec edits its list
    try:
        paddle.jit.save(model, str(path_prefix), input_spec=spec_in)
    except Exception as exc:  # dy2static raises whatever the failing conversion step raised
        raise UserError(f"{spec.name} cannot be exported to a static graph: {describe_trace_failure(exc, type(model).__name__)}") from None


def describe_trace_failure(exc: BaseException, model_class: str) -> str:
    """One line from a paddle.jit conversion error: the underlying error (the message's last
    line) and the innermost model-code frame it names (frames inside Paddle itself skipped)."""
    reason = _last_line(exc)
    lines = [line.strip() for line in str(exc).splitlines()]
    if not reason.startswith(type(exc).__name__):
        reason = f"{type(exc).__name__}: {reason}"
    frames = [m.groups() for m in (re.match(r'File "(.+)", line (\d+), in (\S+)', line) for line in lines)
              if m and "site-packages" not in m.group(1) and "/lib/python" not in m.group(1)]
    if frames:
        path, line, func = frames[-1]
        short = "/".join(Path(path).parts[-2:])
        reason += f" (raised while tracing {short} line {line}, in {func})"
    else:  # Paddle names no frame when the failing conversion is forward itself
        reason += f" (raised while converting {model_class}.forward)"
    return reason


def _check_runtimes(model, path_prefix: Path, batches: list) -> list:
    """The exported graph's logits on each batch in each runtime, against the dynamic model's:
    one check per batch and runtime, in that order.  Each runtime loads the export once, when
    first run."""
    import paddle

    openers = {RUNTIMES[0]: _jit_load_runner}
    for runtime, onednn in zip(RUNTIMES[1:], ONEDNN):
        openers[runtime] = functools.partial(inference_runner, onednn=onednn)
    runners: dict = {}
    checks = []
    for batch in batches:
        with paddle.no_grad():
            expected = model(paddle.to_tensor(batch)).numpy()
        outputs = {}
        for runtime, opener in openers.items():
            if runtime not in runners:
                runners[runtime] = opener(path_prefix)
            outputs[runtime] = runners[runtime](batch)
        for runtime, actual in outputs.items():
            d = Discrepancy.between(expected, actual)
            checks.append({"runtime": runtime, "batch_size": int(batch.shape[0]),
                           "max_abs_err": d.max_abs_err, "mean_abs_err": d.mean_abs_err,
                           "max_abs_logit": float(np.abs(expected).max()),
                           "median_ms": 1000 * median_seconds(runners[runtime], batch)})
    return checks


def median_seconds(run, batch: np.ndarray, repeat: int = TIMED_RUNS) -> float:
    """The median wall time of ``repeat`` calls ``run(batch)`` (a runtime already run once: warm)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def _fails_under(runtime: str):
    """Any error inside the block becomes one line: the export does not run under ``runtime``."""
    try:
        yield
    except Exception as exc:
        raise UserError(f"the exported model does not run under {runtime}: {_last_line(exc)}") from None


def _jit_load_runner(path_prefix: Path):
    """The export loaded by paddle.jit.load: a function from a batch to its logits."""
    import paddle

    with _fails_under("paddle.jit.load"):
        loaded = paddle.jit.load(str(path_prefix))
        loaded.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with _fails_under("paddle.jit.load"), paddle.no_grad():
            return loaded(paddle.to_tensor(batch)).numpy()
    return run


def inference_runner(path_prefix: Path, *, onednn: str, threads: Optional[int] = None):
    """The export loaded by a Paddle Inference CPU predictor in the oneDNN configuration ``onednn``
    (ONEDNN; ``threads``: its CPU math threads, default Paddle Inference's, 1): a function from a
    batch to its logits."""
    from paddle import inference

    runtime = inference_runtime(onednn, threads)
    config = inference.Config(str(graph_file(path_prefix)), str(path_prefix.with_suffix(".pdiparams")))
    configure_cpu(config, onednn)
    if threads:
        config.set_cpu_math_library_num_threads(threads)
    config.disable_glog_info()
    with _fails_under(runtime), _native_stdout_discarded():  # the constant folding at load runs kernels too
        predictor = inference.create_predictor(config)

    def run(batch: np.ndarray) -> np.ndarray:
        with _fails_under(runtime):
            feed = predictor.get_input_handle(predictor.get_input_names()[0])
            feed.reshape(list(batch.shape))
            feed.copy_from_cpu(batch)
            with _native_stdout_discarded():
                predictor.run()
            return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    return run


@contextlib.contextmanager
def _native_stdout_discarded():
    """Discard what C++ code writes to stdout inside the block: Paddle 3.3.1's oneDNN mean
    kernel prints "ReduceMeanCheckIfOneDNNSupport" each time it runs, into the report's stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):  # C stdio's buffer, still bound for /dev/null
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def graph_file(path_prefix: Path) -> Path:
    """The program paddle.jit.save wrote: ``.json`` (PIR, Paddle 3) or ``.pdmodel`` (Paddle 2)."""
    for suffix in (".json", ".pdmodel"):
        if path_prefix.with_suffix(suffix).is_file():
            return path_prefix.with_suffix(suffix)
    raise UserError(f"paddle.jit.save wrote no {path_prefix.name}.json or .pdmodel")


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _deployment_advice(report: ExportReport) -> dict:
    """export.json's Paddle Inference section: every CPU configuration checked, how to set each up,
    and the one that ran the largest checked batch fastest on the exporting machine (one thread)."""
    batch, times = report.largest_batch_times
    return {"recommended": config_recipe(report.fastest_inference),
            "why": f"the fastest Paddle Inference configuration checked, at batch {batch} with Paddle Inference's "
                   f"default of one math thread, on the machine that exported it; which wins depends on the model, "
                   f"the batch and the threads (with more threads plain oneDNN on can be faster): time yours",
            "median_ms": {"batch_size": batch, **{runtime: round(ms, 2) for runtime, ms in times.items()}},
            "configurations": [config_recipe(mode) for mode in ONEDNN]}


def _write_metadata(staging: Path, spec: ModelSpec, report: ExportReport) -> None:
    """What a deployment needs besides the graph: the input it takes and how to prepare images."""
    p = spec.preprocessing
    (staging / METADATA).write_text(json.dumps({
        "model": spec.name,
        "files": {"graph": graph_file(staging / PREFIX).name, "params": f"{PREFIX}.pdiparams"},
        "input": {"name": "image", "shape": report.input_spec, "dtype": "float32", "layout": "NCHW"},
        "output": "logits (batch, num_classes), before softmax",
        "preprocessing": {"resize_shorter_side": p.resize_shorter_side, "interpolation": p.interpolation,
                          "center_crop": p.input_size, "crop_pct": p.crop_pct, "mean": list(p.mean),
                          "std": list(p.std)},
        "paddle_inference": _deployment_advice(report),
        "checks": report.checks,
    }, indent=2) + "\n")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with ``staging``; the old one is removed only once the new is in place."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
