"""verify --all: every registered model (or those matching --models globs) converted and
verified in turn, one summary table, one pass/fail — the regression gate for CI.

Checkpoints come from ``--ckpt-dir`` (files named by model or alias: ``fcvit_b12.pth``,
``regionvit_tiny_224.pth.tar``, ``biformer_small.safetensors`` ...), or, without it, are
seeded official-format checkpoints built from the torch references (random weights: this
proves the conversion, not ImageNet accuracy).  A model that cannot even be built or loaded
is a failure of the gate like one past ``--max-err``, and the run goes on to the next.
"""
from __future__ import annotations

import fnmatch
import gc
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import SAFETENSORS_SUFFIX, TORCH_SUFFIXES
from .errors import UserError, one_line
from .registry import ModelSpec, all_models, register_pairs
from .verify import DEFAULT_MAX_ERR

SEEDED = "seeded official-format (random weights)"


@dataclass
class ModelResult:
    name: str
    checkpoint: str
    max_abs_err: Optional[float] = None
    mean_abs_err: Optional[float] = None
    top1_agreement: Optional[float] = None
    seconds: float = 0.0
    passed: bool = False
    error: Optional[str] = None  # why the model could not be verified at all


@dataclass
class ZooReport:
    max_err: float
    models: list = field(default_factory=list)  # ModelResult
    not_found: list = field(default_factory=list)  # model names with no checkpoint in --ckpt-dir
    wall_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.models) and all(m.passed for m in self.models)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "max_err": self.max_err, "wall_seconds": self.wall_seconds,
                "models": [asdict(m) for m in self.models], "not_found": self.not_found}

    def format(self) -> str:
        rows = [("model", "max err", "mean err", "agreement", "time", "result")]
        for m in self.models:
            if m.error:
                rows.append((m.name, "-", "-", "-", f"{m.seconds:.1f}s", "ERROR"))
            else:
                rows.append((m.name, f"{m.max_abs_err:.2e}", f"{m.mean_abs_err:.2e}",
                             "-" if m.top1_agreement is None else f"{m.top1_agreement * 100:.0f}%",  # dense: none
                             f"{m.seconds:.1f}s", "PASS" if m.passed else "FAIL"))
        lines = table_lines(rows)
        lines += [f"  {m.name}: {m.error}" for m in self.models if m.error]
        if self.not_found:
            lines.append(f"no checkpoint for {len(self.not_found)} model(s): {', '.join(self.not_found)}")
        failed = sum(not m.passed for m in self.models)
        lines.append(f"{len(self.models) - failed} passed, {failed} failed (--max-err {self.max_err:g}) "
                     f"in {self.wall_seconds:.0f} s")
        return "\n".join(lines)


def table_lines(rows: list) -> list:
    """Rows of cells (the first row the header) as text lines, each column as wide as its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def select_models(patterns=(), pairs_dir=None) -> list:
    """Registered models (plug-ins' included) whose name or alias matches any glob (all of them
    without globs).  With ``pairs_dir``, its pair files are registered and chosen from instead."""
    models = all_models()
    if pairs_dir is not None:
        models = {spec.name: spec for spec in register_pairs(pairs_dir)}
    if not patterns:
        return list(models.values())
    chosen = [spec for spec in models.values()
              if any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (spec.name, *spec.aliases))]
    if not chosen:
        raise UserError(f"--models {' '.join(patterns)}: matches no registered model "
                        f"(run 'torch2paddle list')")
    return chosen


def find_checkpoint(ckpt_dir: Path, spec: ModelSpec) -> Optional[Path]:
    """``ckpt_dir/<name or alias><suffix>`` for any checkpoint suffix we read."""
    for name in (spec.name, *spec.aliases):
        for suffix in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
            path = ckpt_dir / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def _one_line(exc: BaseException) -> str:
    text = one_line(str(exc), 200)
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def verify_one(spec: ModelSpec, checkpoint: Optional[Path], workdir: Path, max_err: float,
               verify_kwargs: dict) -> ModelResult:
    """Verify one model from ``checkpoint``, or from a seeded official-format one built in
    ``workdir`` and deleted afterwards (the large ones are hundreds of MB)."""
    from .fixtures import make_official_checkpoint
    from .verify import run_verify

    start = time.perf_counter()
    result = ModelResult(spec.name, str(checkpoint) if checkpoint else SEEDED)
    seeded = workdir / f"{spec.name}.pth"
    try:
        source = checkpoint or make_official_checkpoint(spec.name, seeded)
        report = run_verify(spec.name, source, None, max_err=max_err, **verify_kwargs)
        result.max_abs_err, result.mean_abs_err = report.max_abs_err, report.mean_abs_err
        result.top1_agreement, result.passed = report.top1_agreement, report.passed
    except Exception as exc:  # any model that cannot be verified fails the gate; the rest still run
        result.error = _one_line(exc)
    finally:
        seeded.unlink(missing_ok=True)
        gc.collect()  # release both frameworks' copies of this model before building the next
    result.seconds = time.perf_counter() - start
    return result


def verify_all(*, ckpt_dir=None, patterns=(), pairs_dir=None, max_err: float = DEFAULT_MAX_ERR,
               on_result: Callable[[int, int, ModelResult], None] = lambda i, n, r: None,
               **verify_kwargs) -> ZooReport:
    """Verify every selected model; ``verify_kwargs`` go to ``run_verify`` (batch_size, images,
    input_size, seed, device, ema, key, unsafe_pickle)."""
    start = time.perf_counter()
    specs = select_models(patterns, pairs_dir)
    report = ZooReport(max_err)
    checkpoints = {spec.name: None for spec in specs}
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise UserError(f"--ckpt-dir {ckpt_dir}: no such directory")
        checkpoints = {spec.name: find_checkpoint(ckpt_dir, spec) for spec in specs}
        report.not_found = [name for name, path in checkpoints.items() if path is None]
        specs = [spec for spec in specs if checkpoints[spec.name] is not None]
        if not specs:
            raise UserError(f"--ckpt-dir {ckpt_dir}: no checkpoint named after a selected model "
                            f"(expected e.g. {report.not_found[0]}.pth)")
    with tempfile.TemporaryDirectory(prefix="torch2paddle-verify-all-") as workdir:
        for i, spec in enumerate(specs, 1):
            result = verify_one(spec, checkpoints[spec.name], Path(workdir), max_err, verify_kwargs)
            report.models.append(result)
            on_result(i, len(specs), result)
    report.wall_seconds = time.perf_counter() - start
    return report
