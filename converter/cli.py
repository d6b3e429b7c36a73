"""The torch2paddle command line.  Every user-facing failure is one line on stderr and a
non-zero exit; nothing is written unless the whole job succeeded."""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import click

from .errors import UserError
from .verify import DEFAULT_MAX_ERR

EXIT_FAILED_GATE = 1
EXIT_USER_ERROR = 2


def _write_json(path, data) -> None:
    from .checkpoint import atomic_write

    def write(tmp):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    atomic_write(Path(path), write)


checkpoint_options = [
    click.option("--ema", is_flag=True, help="Use the EMA weights (state_dict_ema / model_ema)."),
    click.option("--key", "entry_key", metavar="NAME", help="Use the state dict stored under this entry."),
    click.option("--unsafe-pickle", is_flag=True,
                 help="Load with torch.load and full pickle instead of the safe reader: RUNS CODE FROM THE "
                      "FILE and needs torch. Only for trusted files that pickle whole models or custom classes."),
]


def option_group(options):
    """One decorator applying a list of click options in the order listed."""
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


with_checkpoint_options = option_group(checkpoint_options)


def runs_both_frameworks(command):
    """For commands that run the PyTorch reference next to the Paddle model: without the verify
    extra they stop with one line naming the pip command (the base install converts without
    torch); with it, both frameworks get the same number of CPU threads."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        from .extras import require_torch, same_threads_for_both_frameworks

        torch = require_torch(f"torch2paddle {click.get_current_context().info_name}")
        same_threads_for_both_frameworks(torch)
        return command(*args, **kwargs)
    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="torch2paddle")
def cli():
    """Convert official PyTorch checkpoints of vision backbones to PaddlePaddle, and prove parity."""


@cli.command("list")
def list_models():
    """Every model, with parameter count and official eval preprocessing."""
    from .registry import all_models
    from .api import count_parameters
    from .verify_all import table_lines

    rows = [("model", "family", "params", "eval preprocessing", "aliases")]
    pair_rows = [("pair", "params", "torch -> paddle", "from")]
    dense_rows = [("dense backbone", "params", "out channels", "strides", "checkpoint", "reproduces", "config")]
    for spec in all_models().values():
        params = f"{count_parameters(spec) / 1e6:.2f}M"
        if getattr(spec, "torch_ref", None) is not None:  # a pair file (a plug-in's, or --pairs)
            pair_rows.append((spec.name, params, spec.source, str(spec.path or "plug-in")))
        elif spec.dense:
            d = spec.dense
            dense_rows.append((spec.name, params, "/".join(map(str, d.channels)), "/".join(map(str, d.strides)),
                               f"{d.framework} '{d.checkpoint_prefix}'", d.source, d.config))
        else:
            rows.append((spec.name, spec.family.name, params, spec.preprocessing.describe(), ", ".join(spec.aliases)))
    lines = table_lines(rows) + [""] + table_lines(dense_rows)
    if len(pair_rows) > 1:
        lines += [""] + table_lines(pair_rows)
    for line in lines:
        click.echo(line)


@cli.command("map")
@click.argument("torch_spec", metavar="TORCH")
@click.argument("paddle_spec", metavar="PADDLE")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The pair file to write (PAIR.toml); an existing one's [hand] section is kept and honoured.")
@click.option("--input-size", type=click.IntRange(16), default=None,
              help="Input size N (N x N) the models run at (default: timm's pretrained_cfg, else 224).")
@click.option("--name", default=None, help="The pair's model name (default: the file name without .toml).")
@click.option("--seed", type=int, default=0, show_default=True)
def map_command(torch_spec, paddle_spec, output, input_size, name, seed):
    """Derive the mapping between a torch model TORCH and a Paddle model PADDLE and write it as a
    pair file.  Specs: timm:NAME, paddleclas:FACTORY, or package.module:callable, each optionally
    with keyword arguments, e.g. 'mypkg.models:build(depth=4)'."""
    from .extras import require_torch
    from .pairs import map_pair

    require_torch("torch2paddle map")
    click.echo(map_pair(torch_spec, paddle_spec, output, input_size=input_size, name=name, seed=seed).summary())


@cli.command()
@click.argument("model")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@with_checkpoint_options
@click.option("--keep-dtype", is_flag=True, help="Keep float16 tensors as float16 (default: float32).")
@click.option("--allow-missing", multiple=True, metavar="PATTERN",
              help="Glob of Paddle keys allowed to stay unfilled (e.g. 'head.*' for another class count).")
@click.option("--num-classes", type=int, default=1000, show_default=True)
@click.option("--img-size", type=int, default=None, help="Input size the model is built for (CrossFormer).")
@click.option("--reverse", is_flag=True,
              help="The other way: Paddle weights SRC (.pdparams) -> official-format PyTorch checkpoint DST (.pth).")
def convert(model, src, dst, force, ema, entry_key, unsafe_pickle, keep_dtype, allow_missing, num_classes, img_size,
            reverse):
    """Convert an official PyTorch checkpoint SRC of MODEL into Paddle weights DST (.pdparams)
    (with --reverse, Paddle weights back into an official PyTorch checkpoint)."""
    from .api import convert as run_convert

    if reverse:
        _convert_reverse(model, src, dst, force=force, num_classes=num_classes, img_size=img_size,
                         torch_only={"--ema": ema, "--key": entry_key, "--unsafe-pickle": unsafe_pickle,
                                     "--keep-dtype": keep_dtype, "--allow-missing": allow_missing})
        return
    result = run_convert(model, src, dst, force=force, ema=ema, key=entry_key, unsafe_pickle=unsafe_pickle,
                         keep_dtype=keep_dtype, allow_missing=allow_missing, num_classes=num_classes,
                         img_size=img_size)
    click.echo(result.summary())


def _convert_reverse(model, src, dst, *, torch_only: dict, **kwargs):
    from .api import convert_reverse

    given = [name for name, value in torch_only.items() if value]
    if given:
        raise UserError(f"{', '.join(given)} apply to reading PyTorch checkpoints, not to --reverse")
    click.echo(convert_reverse(model, src, dst, **kwargs).summary())


class InputSize(click.ParamType):
    """``N`` (N x N) or ``HxW``; each side at least 16."""

    name = "N|HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)):
            return value
        parts = str(value).lower().split("x")
        try:
            sides = [int(p) for p in parts]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2) or min(sides) < 16:
            self.fail(f"'{value}' is not N or HxW with sides of at least 16 (e.g. 224 or 800x1216)", param, ctx)
        return sides[0] if len(sides) == 1 else tuple(sides)


device_option = click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True)
input_size_option = click.option("--input-size", type=InputSize(), default=None,
                                 help="N or HxW (default: official; a dense backbone runs two sizes).")
json_option = click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                           help="Write the whole report as JSON.")

# The batch both models see (verify and diff).
batch_options = [
    click.option("--images", type=click.Path(file_okay=False, path_type=Path),
                 help="Directory of images fed through the model's official eval preprocessing "
                      "(default: a seeded random batch)."),
    click.option("--batch-size", type=click.IntRange(1), default=2, show_default=True),
    input_size_option,
    click.option("--seed", type=int, default=0, show_default=True),
    device_option,
]
verify_options = batch_options + [
    click.option("--max-err", type=float, default=DEFAULT_MAX_ERR, show_default=True,
                 help="Gate: exit 1 when the max abs logit error exceeds this."),
    json_option,
]


def torch_ckpt_option(required: bool, help_suffix: str = ""):
    return click.option("--torch-ckpt", type=click.Path(dir_okay=False, path_type=Path), required=required,
                        help="The official PyTorch checkpoint" + help_suffix + ".")


paddle_params_option = click.option("--paddle-params", type=click.Path(dir_okay=False, path_type=Path),
                                    help="Converted .pdparams (default: convert the checkpoint in memory).")


@cli.command()
@click.argument("model", required=False)
@torch_ckpt_option(False, " (required without --all)")
@paddle_params_option
@click.option("--all", "all_models", is_flag=True,
              help="Verify every registered model in turn: one summary table, exit 1 if any fails.")
@click.option("--ckpt-dir", type=click.Path(file_okay=False, path_type=Path),
              help="With --all: real checkpoints named by model (fcvit_b12.pth, ...); "
                   "default: seeded official-format checkpoints.")
@click.option("--models", "patterns", multiple=True, metavar="GLOB",
              help="With --all: only models matching this glob, e.g. 'fcvit_*' (repeatable).")
@click.option("--pairs", "pairs_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --all: verify the pair files (*.toml) in this directory instead of the registered models.")
@with_checkpoint_options
@option_group(verify_options)
@click.option("--train", "train_steps", is_flag=True,
              help="Train both models on the batch (train mode, stochastic ops at rate 0) and compare the loss, "
                   "every parameter's gradient, the weights after --steps optimizer steps, BatchNorm statistics.")
@click.option("--steps", type=click.IntRange(1), default=3, show_default=True, help="With --train: optimizer steps.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="With --train: SGD with momentum 0.9, or AdamW (weight decay 0.05 but for the official no-decay set).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="With --train: learning rate.")
@click.option("--max-grad-err", type=float, default=1e-4, show_default=True,
              help="With --train: gate on each gradient's error relative to its RMS (or 3x the reference's own "
                   "float32 error, where that is larger).")
@runs_both_frameworks
def verify(model, torch_ckpt, paddle_params, all_models, ckpt_dir, patterns, pairs_dir, ema, entry_key, unsafe_pickle,
           train_steps, steps, optimizer, lr, max_grad_err, **kwargs):
    """Run the torch reference and the Paddle model on the same batch and compare them."""
    checkpoint_kwargs = dict(ema=ema, key=entry_key, unsafe_pickle=unsafe_pickle)
    if train_steps:
        if all_models or not model or torch_ckpt is None:
            raise UserError("verify --train needs MODEL and --torch-ckpt (one model at a time)")
        _verify_train(model, torch_ckpt, paddle_params, steps=steps, optimizer=optimizer, lr=lr,
                      max_grad_err=max_grad_err, **checkpoint_kwargs, **kwargs)
        return
    if all_models:
        if model or torch_ckpt or paddle_params:
            raise UserError("verify --all takes no MODEL, --torch-ckpt or --paddle-params "
                            "(choose models with --models GLOB, real checkpoints with --ckpt-dir DIR)")
        _verify_all(ckpt_dir, patterns, pairs_dir, **checkpoint_kwargs, **kwargs)
    elif ckpt_dir or patterns or pairs_dir:
        raise UserError("--ckpt-dir, --models and --pairs go with --all")
    elif not model or torch_ckpt is None:
        raise UserError("verify needs MODEL and --torch-ckpt (or --all to verify every registered model)")
    else:
        _verify(model, torch_ckpt, paddle_params, **checkpoint_kwargs, **kwargs)


def _verify(model, torch_ckpt, paddle_params, *, json_path=None, **kwargs):
    from .verify import run_verify

    report = run_verify(model, torch_ckpt, paddle_params, **kwargs)
    click.echo(report.format())
    data = report.to_dict()
    if not report.passed:
        data["first_divergent_layer"] = _locate_divergence(model, torch_ckpt, paddle_params, **kwargs)
    if json_path:
        _write_json(json_path, data)
    if not report.passed:
        click.echo(f"error: {report.model}: max abs logit error {report.max_abs_err:.3e} exceeds "
                   f"--max-err {report.max_err:g}", err=True)
        sys.exit(EXIT_FAILED_GATE)
    return report


def _verify_train(model, torch_ckpt, paddle_params, *, json_path=None, max_err=None, images=None, **kwargs):
    from .train import run_train_verify

    if images is not None:
        raise UserError("verify --train runs on a seeded random batch with seeded labels; --images does not apply")
    report = run_train_verify(model, torch_ckpt, paddle_params, **kwargs)
    click.echo(report.format())
    if json_path:
        _write_json(json_path, report.to_dict())
    if not report.passed:
        click.echo(f"error: {report.model}: {'; '.join(report.failures())}", err=True)
        sys.exit(EXIT_FAILED_GATE)


def _locate_divergence(model, torch_ckpt, paddle_params, *, max_err, **kwargs):
    """After a failed gate: run diff on the same batch and print its verdict; return the first
    divergent layer's torch path (None when no single layer exceeds diff's tolerance)."""
    from .diff import run_diff

    click.echo("locating the divergence layer by layer (torch2paddle diff) ...")
    try:
        diff = run_diff(model, torch_ckpt, paddle_params, **kwargs)
    except UserError as exc:
        click.echo(f"diff could not run: {exc}")
        return None
    click.echo(diff.verdict())
    first = diff.first_divergent
    return first.torch if first else None


def _verify_all(ckpt_dir, patterns, pairs_dir, *, json_path=None, **kwargs):
    from .verify_all import verify_all

    def show(i, n, r):
        outcome = f"ERROR {r.error}" if r.error else (
            f"{'PASS' if r.passed else 'FAIL'}  max abs err {r.max_abs_err:.3e}")
        click.echo(f"[{i:>{len(str(n))}}/{n}] {r.name:<26}{outcome}  ({r.seconds:.1f} s)")

    report = verify_all(ckpt_dir=ckpt_dir, patterns=patterns, pairs_dir=pairs_dir, on_result=show, **kwargs)
    click.echo("")
    click.echo(report.format())
    if json_path:
        _write_json(json_path, report.to_dict())
    if not report.passed:
        failed = [m.name for m in report.models if not m.passed]
        click.echo(f"error: {len(failed)} of {len(report.models)} models failed verification: "
                   f"{', '.join(failed)}", err=True)
        sys.exit(EXIT_FAILED_GATE)


@cli.command()
@click.argument("model")
@torch_ckpt_option(True)
@paddle_params_option
@with_checkpoint_options
@click.option("--tol", type=float, default=DEFAULT_MAX_ERR, show_default=True,
              help="A layer diverges when its max abs output error exceeds TOL x max(1, max |torch output|).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw the error per layer (log scale, first divergent layer marked) to PATH.png (matplotlib).")
@click.option("--backward", is_flag=True,
              help="Compare the gradients of the layer outputs (train mode, stochastic ops at rate 0, cross-entropy "
                   "on seeded labels), in backward order, each relative to its magnitude.")
@option_group(batch_options + [json_option])
@runs_both_frameworks
def diff(model, torch_ckpt, paddle_params, ema, entry_key, unsafe_pickle, json_path, plot_path, backward, **kwargs):
    """Compare MODEL's torch reference and Paddle model layer by layer and name the first layer
    whose output diverges (exit 1 when one does)."""
    from .diff import check_plot_path, plot_report, run_diff

    if plot_path is not None:
        check_plot_path(plot_path)  # before the models run, not after
    report = run_diff(model, torch_ckpt, paddle_params, ema=ema, key=entry_key, unsafe_pickle=unsafe_pickle,
                      backward=backward, **kwargs)
    click.echo(report.format())
    if json_path:
        _write_json(json_path, report.to_dict())
    if plot_path:
        plot_report(report, plot_path)
        click.echo(f"plot written to {plot_path}")
    first = report.first_divergent
    if first is not None:
        click.echo(f"error: {report.model}: {report.verdict().split(';')[0]}", err=True)
        sys.exit(EXIT_FAILED_GATE)


@cli.command()
@click.argument("model")
@click.argument("params", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Fix the batch dimension (default: dynamic).")
@input_size_option
@click.option("--max-err", type=float, default=1e-5, show_default=True,
              help="Gate: the exported model's logits must equal the dynamic model's within this, "
                   "times max |logit| where that exceeds 1.")
@click.option("--num-classes", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--force", is_flag=True, help="Replace an earlier export in OUT_DIR.")
@json_option
def export(model, params, out_dir, json_path, **kwargs):
    """Save MODEL with weights PARAMS (.pdparams) as a static Paddle inference model in OUT_DIR,
    reload it (paddle.jit.load; Paddle Inference with oneDNN off, on, and on for fused ops only) and
    check it against the dynamic model."""
    from .export import export_model

    report = export_model(model, params, out_dir, **kwargs)
    click.echo(report.format())
    if json_path:
        _write_json(json_path, report.to_dict())
    if not report.passed:
        w = report.worst
        click.echo(f"error: {report.model}: the exported model's logits differ from the dynamic model's by "
                   f"{w['max_abs_err']:.3e} under {w['runtime']} > --max-err {report.max_err:g} x max(1, max "
                   f"|logit| {w['max_abs_logit']:.3g}); nothing written", err=True)
        sys.exit(EXIT_FAILED_GATE)


@cli.command("eval")
@click.argument("model")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="ImageNet-style folder DATA/<class>/<image>, or the root for --list "
                   "(a list file given here uses its own folder as the root).")
@click.option("--list", "list_path", type=click.Path(dir_okay=False, path_type=Path),
              help="List file of 'relative/path label' lines, paths relative to --data.")
@torch_ckpt_option(True)
@paddle_params_option
@with_checkpoint_options
@click.option("--limit", type=click.IntRange(1), help="Evaluate N images spread evenly over the dataset.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True,
              help="Threads decoding and preprocessing images ahead of the models (0: none).")
@device_option
@click.option("--num-classes", type=click.IntRange(1), default=1000, show_default=True)
@json_option
@click.option("--no-progress", is_flag=True, help="No progress bar (it is only shown on a terminal anyway).")
@click.option("--paddle-runtime", type=click.Choice(["auto", "dygraph", "inference"]), default="auto",
              show_default=True,
              help="How the Paddle model runs. auto: on CPU, traced and run by Paddle Inference (oneDNN on, or "
                   "on for its fused ops only: the faster on the first batch of those whose logits equal "
                   "dygraph's), else dygraph (the report says why); inference: that or an error; dygraph: the "
                   "dynamic model.")
@runs_both_frameworks
def evaluate(model, data, list_path, torch_ckpt, paddle_params, ema, entry_key, unsafe_pickle, json_path,
             no_progress, **kwargs):
    """Top-1 / top-5 of the torch reference and the Paddle model on the same labelled images."""
    from .evaluate import run_eval

    report = run_eval(model, data, torch_ckpt, paddle_params, list_path=list_path, ema=ema, key=entry_key,
                      unsafe_pickle=unsafe_pickle, progress=not no_progress, **kwargs)
    click.echo(report.format())
    if json_path:
        _write_json(json_path, report.to_dict())


@cli.command()
@click.option("--model", default="fcvit_b12", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the example checkpoint and weights (default: a temporary directory).")
@runs_both_frameworks
def demo(model, workdir):
    """The whole job on a built-in example: an official-format checkpoint with seeded RANDOM
    weights -> convert -> verify."""
    from .api import convert as run_convert
    from .fixtures import make_official_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        src, dst = work / f"{model}.pth", work / f"{model}.pdparams"
        click.echo(f"1/3 building an official-format {model} checkpoint with seeded RANDOM weights "
                   f"(not trained weights: no download happens) -> {src}")
        make_official_checkpoint(model, src)
        click.echo(f"2/3 torch2paddle convert {model} {src} {dst} --force")
        click.echo(run_convert(model, src, dst, force=True).summary())
        click.echo(f"3/3 torch2paddle verify {model} --torch-ckpt {src} --paddle-params {dst} --max-err 1e-4")
        _verify(model, src, dst, max_err=DEFAULT_MAX_ERR)


def _quiet_framework_logs() -> None:
    """Paddle prints C++ log lines and a ccache notice on import; the CLI's output is its report."""
    import warnings

    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", message="No ccache found")


def prefer_mkl_avx2_on_amd() -> None:
    """Paddle's bundled MKL runs a generic code path on AMD CPUs; ``MKL_DEBUG_CPU_TYPE=5`` makes it
    take its AVX2 kernels (every AMD CPU with AVX2 runs them).  On an AMD EPYC, one thread, Paddle's
    dygraph forward went from 1.9-2.3x torch's to 1.06-1.46x (crossformer_small batch 1: 352 -> 172 ms;
    benchmarks/forward_benchmark.py).  MKL reads it when it first runs, so this is set before anything
    calls Paddle; a value the user set wins, and torch's newer MKL ignores it."""
    try:
        amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    if amd:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


def main(argv=None):
    """Entry point: turns every user-facing error into one line and an exit code."""
    _quiet_framework_logs()
    prefer_mkl_avx2_on_amd()
    try:
        cli.main(args=argv, prog_name="torch2paddle", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USER_ERROR)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        for line in getattr(exc, "details", []):
            click.echo(f"  {line}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # an internal bug: still one line, with a way to see more
        if os.environ.get("TORCH2PADDLE_DEBUG"):
            raise
        click.echo(f"error: internal: {type(exc).__name__}: {exc} (set TORCH2PADDLE_DEBUG=1 for a traceback)",
                   err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
