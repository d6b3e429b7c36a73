"""eval: ImageNet-style accuracy of the torch reference and the Paddle model on the same images.

Each image goes through the model's official eval preprocessing once (``preprocess``), and the
same float32 batch is fed to both frameworks, so any accuracy difference is the models', not
the pipelines'.  Unreadable images are skipped and reported, never fatal.  Accuracies are in
percent; throughput is images per second of model forward time, the first batch (warm-up:
allocation, kernel selection) excluded when there are more.

The Paddle side runs in the fastest runtime that reproduces the dygraph model (``paddle_runtime``):
on CPU, ``auto`` traces the model into a temporary directory and loads it into Paddle Inference
predictors at torch's thread count, one per ``CANDIDATE_ONEDNN`` configuration (fcvit_b12, batch 16,
2 threads: ~2.1x dygraph's speed); of those whose logits on the first batch equal the dygraph
model's within export's gate, it keeps the one that ran that batch fastest.  If none does it runs
dygraph and the report says why.  ``inference`` insists (an error instead), ``dygraph`` skips it.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .datasets import open_dataset, read_sample
from .errors import UserError
from .registry import get_spec
from .export import (DEFAULT_MAX_ERR as EXPORT_MAX_ERR, gate, inference_runner, inference_runtime, median_seconds,
                     trace_for_inference)
from .verify import Discrepancy, forward_both, load_model_pair, model_line, paddle_forward, resolve_device

PREFETCH_BATCHES = 2  # batches decoded ahead of the models: bounds the memory they take
SHOWN_SKIPPED = 10  # unreadable files listed in the text report (the JSON lists all)
PADDLE_RUNTIMES = ("auto", "dygraph", "inference")  # --paddle-runtime
# The Paddle Inference configurations eval tries (export.ONEDNN), the faster on the first batch kept:
# oneDNN for its fused ops only is the faster with one thread, plain oneDNN on can be with more
# (crossformer_small at batch 8, 2 threads: 485 vs 389 ms), where Paddle's own kernels run one thread.
CANDIDATE_ONEDNN = ("fused", "on")


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image: is the label among the ``k`` highest logits (ties broken by class index)?"""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


@dataclass
class LoadedBatch:
    images: Optional[np.ndarray]  # NCHW float32 of the readable images, None if there are none
    labels: np.ndarray
    unreadable: list

    @property
    def size(self) -> int:
        return len(self.labels) + len(self.unreadable)


def _assemble(results: list, labels: list) -> LoadedBatch:
    good = [(img, label) for (img, bad), label in zip(results, labels) if bad is None]
    return LoadedBatch(np.stack([img for img, _ in good]) if good else None,
                       np.asarray([label for _, label in good], dtype=np.int64),
                       [bad for _, bad in results if bad is not None])


def load_batches(samples: list, pre, batch_size: int, workers: int) -> Iterator[LoadedBatch]:
    """Preprocessed batches in dataset order.  With ``workers`` > 0, threads decode the next
    batches while the models run (PIL releases the GIL while decoding and resizing); at most
    PREFETCH_BATCHES wait in memory."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    read = partial(read_sample, pre=pre)
    if workers == 0:
        for chunk in chunks:
            yield _assemble([read(s) for s in chunk], [s.label for s in chunk])
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(([pool.submit(read, s) for s in chunk], [s.label for s in chunk]))
            if len(pending) > PREFETCH_BATCHES:
                futures, labels = pending.popleft()
                yield _assemble([f.result() for f in futures], labels)
        while pending:
            futures, labels = pending.popleft()
            yield _assemble([f.result() for f in futures], labels)


@dataclass
class FrameworkScore:
    top1: float  # percent
    top5: float  # percent
    images_per_second: float
    forward_seconds: float


class _Tally:
    """Running counts over batches: hits per framework, agreement, logit error, forward times."""

    def __init__(self, k: int):
        self.k = k
        self.images = 0
        self.hits = {f: np.zeros(2, dtype=np.int64) for f in ("torch", "paddle")}  # top-1, top-k
        self.agree = 0
        self.max_abs_err = 0.0
        self.timings = []  # (images, torch seconds, paddle seconds) per batch
        self.unreadable = []

    def add(self, run: tuple, labels: np.ndarray) -> None:
        """``run``: what ``forward_both`` returns for the batch with these labels."""
        t_logits, p_logits, t_sec, p_sec = run
        for framework, logits in (("torch", t_logits), ("paddle", p_logits)):
            self.hits[framework] += (int(topk_hits(logits, labels, 1).sum()),
                                     int(topk_hits(logits, labels, self.k).sum()))
        self.agree += int((t_logits.argmax(-1) == p_logits.argmax(-1)).sum())
        self.max_abs_err = max(self.max_abs_err, Discrepancy.between(t_logits, p_logits).max_abs_err)
        self.images += len(labels)
        self.timings.append((len(labels), t_sec, p_sec))

    def percent(self, count: int) -> float:
        return 100.0 * count / self.images

    def score(self, framework: str) -> FrameworkScore:
        timed = np.asarray(self.timings[1:] if len(self.timings) > 1 else self.timings)
        seconds = float(timed[:, 1 if framework == "torch" else 2].sum())
        top1, topk = self.hits[framework]
        return FrameworkScore(self.percent(top1), self.percent(topk),
                              float(timed[:, 0].sum()) / seconds if seconds else float("inf"), seconds)


@dataclass
class PaddleRunner:
    """The Paddle side of eval: ``forward`` maps a batch to its logits, in ``runtime``."""
    runtime: str  # what runs, as the report names it
    forward: Callable
    dygraph_model: object  # the check's reference, and the fallback
    requested: str  # --paddle-runtime
    note: Optional[str] = None  # why auto runs dygraph, when it does
    check: Optional[dict] = None  # first batch vs dygraph: {batch_size, max_abs_err, max_abs_logit, gate, seconds}
    candidates: dict = field(default_factory=dict)  # Paddle Inference not yet run: runtime name -> forward

    @property
    def needs_check(self) -> bool:
        """Paddle Inference's candidates still to be checked and timed on the first batch."""
        return bool(self.candidates)


def _dygraph(model, requested: str, device: str, note: Optional[str] = None, check=None) -> PaddleRunner:
    return PaddleRunner(f"Paddle dygraph ({device.upper()})", partial(paddle_forward, model), model,
                        requested, note, check)


def _fall_back(runner: PaddleRunner, reason: str, check=None) -> PaddleRunner:
    """Dygraph in place of Paddle Inference under ``auto``; under ``inference``, a one-line error."""
    if runner.requested == "inference":
        raise UserError(f"--paddle-runtime inference: {reason}")
    return _dygraph(runner.dygraph_model, runner.requested, "cpu", f"Paddle Inference not used: {reason}", check)


@contextlib.contextmanager
def paddle_runner(requested: str, spec, model, device: str, threads: int) -> Iterator[PaddleRunner]:
    """The runner eval starts with.  On CPU, unless ``requested`` is dygraph: the model traced into a
    temporary directory (kept until the block ends) and loaded into a Paddle Inference predictor per
    ``CANDIDATE_ONEDNN`` configuration, ``threads`` math threads, to be checked and timed on the
    first batch (``checked_on_first_batch``)."""
    if requested not in PADDLE_RUNTIMES:
        raise UserError(f"--paddle-runtime {requested}: expected one of {', '.join(PADDLE_RUNTIMES)}")
    if requested == "dygraph" or device != "cpu":
        if requested == "inference":
            raise UserError("--paddle-runtime inference runs on CPU: with --device gpu, use auto or dygraph")
        yield _dygraph(model, requested, device)
        return
    with tempfile.TemporaryDirectory(prefix="torch2paddle-eval-") as tmp:
        runner = _dygraph(model, requested, device)
        try:
            path_prefix = trace_for_inference(spec, model, Path(tmp), spec.preprocessing.input_size)
            candidates = {inference_runtime(mode, threads): inference_runner(path_prefix, onednn=mode, threads=threads)
                          for mode in CANDIDATE_ONEDNN}
        except UserError as exc:
            runner = _fall_back(runner, str(exc))
        else:
            first = next(iter(candidates))
            runner = PaddleRunner(first, candidates[first], model, requested, candidates=candidates)
        yield runner


def checked_on_first_batch(runner: PaddleRunner, batch: np.ndarray) -> PaddleRunner:
    """Of ``runner``'s candidates, the fastest (one timed forward of the first batch each, after the
    check's) whose first-batch logits pass the export gate (EXPORT_MAX_ERR x max(1, max |logit|))
    against the dygraph model, its check recorded; if none does, what ``_fall_back`` gives."""
    expected = paddle_forward(runner.dygraph_model, batch)
    max_abs_logit = float(np.abs(expected).max())
    passed, failure, failed_check = {}, None, None
    for runtime, forward in runner.candidates.items():
        try:
            actual = forward(batch)
        except UserError as exc:
            failure = failure or str(exc)
            continue
        check = {"batch_size": int(batch.shape[0]), "max_abs_err": Discrepancy.between(expected, actual).max_abs_err,
                 "max_abs_logit": max_abs_logit, "gate": gate(EXPORT_MAX_ERR, max_abs_logit)}
        if check["max_abs_err"] > check["gate"]:
            failure = failure or (f"its logits on the first batch under {runtime} differ from the dygraph model's by "
                                  f"{check['max_abs_err']:.3e} > gate {check['gate']:.3e} = {EXPORT_MAX_ERR:g} x "
                                  f"max(1, max |logit| {max_abs_logit:.3g})")
            failed_check = failed_check or check
            continue
        check["seconds"] = median_seconds(forward, batch, repeat=1)
        passed[runtime] = (forward, check)
    if not passed:
        return _fall_back(runner, failure, failed_check)
    fastest = min(passed, key=lambda runtime: passed[runtime][1]["seconds"])
    forward, check = passed[fastest]
    check["candidate_seconds"] = {runtime: c["seconds"] for runtime, (_, c) in passed.items()}
    return replace(runner, runtime=fastest, forward=forward, check=check, candidates={})


@dataclass
class EvalReport:
    model: str
    data: str
    preprocessing: str
    checkpoint_entry: str
    paddle_params: str
    device: str
    batch_size: int
    images: int  # evaluated
    skipped: int  # unreadable, left out of every figure
    torch: dict
    paddle: dict
    top1_delta: float  # paddle - torch, percentage points
    top5_delta: float
    agreement: float  # percent of images where both predict the same top-1 class
    max_abs_logit_err: float
    wall_seconds: float
    skipped_images: list = field(default_factory=list)  # [{path, reason}]
    paddle_runtime: str = ""  # what ran the Paddle model, e.g. "Paddle Inference (CPU, oneDNN fused ops only, 2 threads)"
    paddle_runtime_requested: str = "auto"  # --paddle-runtime
    paddle_runtime_note: Optional[str] = None  # why auto ran dygraph, when it did
    paddle_runtime_check: Optional[dict] = None  # Paddle Inference's first batch vs dygraph (see PaddleRunner)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        t, p = self.torch, self.paddle
        lines = [
            model_line(13, self.model, self.checkpoint_entry, self.paddle_params),
            f"data         {self.data}",
            f"preprocess   {self.preprocessing}",
            f"images       {self.images} evaluated, {self.skipped} skipped (unreadable); batch {self.batch_size}, "
            f"{self.device} float32",
            self._runtime_line(),
            f"{'':13}{'top-1':>9}{'top-5':>9}{'images/s':>11}{'forward s':>11}",
            f"{'torch':13}{t['top1']:>8.3f}%{t['top5']:>8.3f}%{t['images_per_second']:>11.1f}"
            f"{t['forward_seconds']:>11.2f}",
            f"{'paddle':13}{p['top1']:>8.3f}%{p['top5']:>8.3f}%{p['images_per_second']:>11.1f}"
            f"{p['forward_seconds']:>11.2f}",
            f"{'delta':13}{self.top1_delta:>+9.3f}{self.top5_delta:>+9.3f}   (paddle - torch, points)",
            f"agreement    {self.agreement:.3f}% same top-1 class; max abs logit error {self.max_abs_logit_err:.3e}",
        ]
        for item in self.skipped_images[:SHOWN_SKIPPED]:
            lines.append(f"  skipped {item['path']}: {item['reason']}")
        if self.skipped > SHOWN_SKIPPED:
            lines.append(f"  ... and {self.skipped - SHOWN_SKIPPED} more (all are listed in --json)")
        lines.append(f"time         {self.wall_seconds:.1f} s")
        return "\n".join(lines)

    def _runtime_line(self) -> str:
        line = f"paddle runs  {self.paddle_runtime} (--paddle-runtime {self.paddle_runtime_requested})"
        c = self.paddle_runtime_check
        if c and not self.paddle_runtime_note:
            line += (f"; first batch vs dygraph: max abs {c['max_abs_err']:.3e} <= gate {c['gate']:.1e}")
            others = {runtime: s for runtime, s in c.get("candidate_seconds", {}).items() if runtime != self.paddle_runtime}
            for runtime, seconds in others.items():
                line += f"; faster on it ({c['seconds']:.3f} s) than {runtime} ({seconds:.3f} s)"
        if self.paddle_runtime_note:
            line += f"; {self.paddle_runtime_note}"
        return line


def _progress_bar(total: int, model: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: shown on a terminal, silent in CI logs and pipes.
    return tqdm(total=total, unit="img", desc=model, file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True)


def _none_readable(dataset, unreadable: list) -> UserError:
    first = unreadable[0]
    return UserError(f"{dataset.description}: none of the {len(dataset)} images could be read "
                     f"(e.g. {first.path}: {first.reason})")


def run_eval(name: str, data, torch_ckpt, paddle_params=None, *, list_path=None, limit: Optional[int] = None,
             batch_size: int = 32, workers: int = 2, device: str = "cpu", ema: bool = False,
             key: Optional[str] = None, unsafe_pickle: bool = False, num_classes: int = 1000,
             progress: bool = True, paddle_runtime: str = "auto") -> EvalReport:
    """Top-1 / top-5 of the torch reference (``torch_ckpt``) and the Paddle model
    (``paddle_params``, or converted in memory) on the labelled images at ``data``; the Paddle
    model runs as ``paddle_runtime`` (PADDLE_RUNTIMES, see the module docstring) chooses."""
    import torch

    start = time.perf_counter()
    spec = get_spec(name)
    if spec.dense:
        raise UserError(f"{spec.name} is a dense backbone (feature maps, no classes): eval measures ImageNet "
                        f"accuracy of classifiers; verify compares its features")
    dataset = open_dataset(data, list_path, limit)
    if dataset.num_classes > num_classes:
        raise UserError(f"{dataset.description}: labels go up to {dataset.num_classes - 1}, "
                        f"but the model has {num_classes} classes (--num-classes)")
    device = resolve_device(device)
    pair = load_model_pair(spec, torch_ckpt, paddle_params, device=device, ema=ema, key=key,
                           unsafe_pickle=unsafe_pickle, num_classes=num_classes)
    tally = _Tally(k=min(5, num_classes))
    with paddle_runner(paddle_runtime, spec, pair.paddle_model, device, torch.get_num_threads()) as runner, \
            _progress_bar(len(dataset), spec.name, progress) as bar:
        for batch in load_batches(dataset.samples, spec.preprocessing, batch_size, workers):
            tally.unreadable += batch.unreadable
            if batch.images is not None:
                if runner.needs_check:
                    runner = checked_on_first_batch(runner, batch.images)
                tally.add(forward_both(pair.torch_model, pair.paddle_model, batch.images, device,
                                       paddle_run=runner.forward), batch.labels)
            bar.update(batch.size)
            if tally.images:
                bar.set_postfix(top1_torch=f"{tally.percent(tally.hits['torch'][0]):.2f}%",
                                top1_paddle=f"{tally.percent(tally.hits['paddle'][0]):.2f}%", refresh=False)
    if not tally.images:
        raise _none_readable(dataset, tally.unreadable)
    torch_score, paddle_score = tally.score("torch"), tally.score("paddle")
    return EvalReport(
        model=spec.name, data=dataset.description, preprocessing=spec.preprocessing.describe(),
        checkpoint_entry=pair.checkpoint_entry, paddle_params=pair.paddle_params, device=device,
        batch_size=batch_size, images=tally.images, skipped=len(tally.unreadable),
        torch=asdict(torch_score), paddle=asdict(paddle_score),
        top1_delta=paddle_score.top1 - torch_score.top1, top5_delta=paddle_score.top5 - torch_score.top5,
        agreement=tally.percent(tally.agree), max_abs_logit_err=tally.max_abs_err,
        wall_seconds=time.perf_counter() - start,
        skipped_images=[{"path": str(u.path), "reason": u.reason} for u in tally.unreadable],
        paddle_runtime=runner.runtime, paddle_runtime_requested=paddle_runtime,
        paddle_runtime_note=runner.note, paddle_runtime_check=runner.check,
    )
