"""Model specs: how a pair file (and ``torch2paddle map``) names a model to build.

    timm:convnext_tiny                   timm.create_model("convnext_tiny", pretrained=False)
    paddleclas:ConvNeXt_tiny             paddleclas.ppcls.arch.backbone.ConvNeXt_tiny()
    mypkg.models:build(depth=4)          mypkg.models.build(depth=4)

Keyword arguments go in parentheses as Python literals (``timm:vit_tiny_patch16_224(num_classes=10)``);
positional arguments are refused, since a pair file must say what each value means.  Every failure
to build -- an unknown timm name, an unimportable module, a factory that returns no model -- is one
UserError line.  Nothing is imported until a model is built.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import re
from dataclasses import dataclass, field

from .errors import UserError, first_sentence

PADDLECLAS_BACKBONES = "paddleclas.ppcls.arch.backbone"
_SPEC = re.compile(r"^(?P<source>[A-Za-z_][\w.]*):(?P<name>[A-Za-z_]\w*)(?:\((?P<args>.*)\))?$", re.S)


@dataclass(frozen=True)
class ModelRef:
    """One side of a pair: where the model comes from, its factory name and keyword arguments."""

    source: str  # "timm", "paddleclas" or an importable module path
    name: str  # timm model name, PaddleClas factory, or the callable in ``source``
    kwargs: dict = field(default_factory=dict, hash=False)

    @property
    def spec(self) -> str:
        """The spec without its keyword arguments (they are written to the pair file apart)."""
        return f"{self.source}:{self.name}"

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return self.spec + (f"({args})" if args else "")

    def with_kwargs(self, **extra) -> "ModelRef":
        return ModelRef(self.source, self.name, {**self.kwargs, **extra})

    def framework_expected(self) -> str | None:
        """'torch' for timm, 'paddle' for PaddleClas; None for a module:callable (decided by what it returns)."""
        return {"timm": "torch", "paddleclas": "paddle"}.get(self.source)


def parse_spec(text: str, kwargs: dict | None = None) -> ModelRef:
    """``timm:NAME``, ``paddleclas:FACTORY`` or ``package.module:callable``, each optionally
    followed by ``(key=literal, ...)``; ``kwargs`` (from a pair file) are added to those."""
    match = _SPEC.match(text.strip())
    if not match:
        raise UserError(f"model spec '{text}': expected timm:NAME, paddleclas:FACTORY or "
                        f"package.module:callable, optionally with (key=value, ...)")
    parsed = _parse_kwargs(text, match.group("args")) if match.group("args") is not None else {}
    return ModelRef(match.group("source"), match.group("name"), {**parsed, **(kwargs or {})})


def _parse_kwargs(text: str, args: str) -> dict:
    try:
        call = ast.parse(f"f({args})", mode="eval").body
    except SyntaxError:
        raise UserError(f"model spec '{text}': the arguments are not Python syntax") from None
    if call.args:
        raise UserError(f"model spec '{text}': give arguments by keyword (key=value), not by position")
    kwargs = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise UserError(f"model spec '{text}': **expansion is not allowed; give each keyword")
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise UserError(f"model spec '{text}': {keyword.arg}= must be a literal "
                            f"(number, string, bool, list, tuple, dict)") from None
    return kwargs


def build(ref: ModelRef, framework: str):
    """The model ``ref`` names, in eval mode; ``framework`` ('torch' or 'paddle') is what the
    caller needs it to be, checked before and after building."""
    expected = ref.framework_expected()
    if expected and expected != framework:
        raise UserError(f"{ref.spec}: builds a {expected} model, but a {framework} model is needed here")
    builder = {"timm": _build_timm, "paddleclas": _build_paddleclas}.get(ref.source, _build_callable)
    model = builder(ref)
    actual = framework_of(model)
    if actual != framework:
        what = f"a {actual} model" if actual else f"a {type(model).__module__}.{type(model).__name__}"
        raise UserError(f"{ref}: returned {what}, not a {framework} model "
                        f"({'torch.nn.Module' if framework == 'torch' else 'paddle.nn.Layer'})")
    model.eval()
    return model


def framework_of(model) -> str | None:
    """'torch' for a torch.nn.Module, 'paddle' for a paddle.nn.Layer, None otherwise (without
    importing a framework the object cannot come from)."""
    root = type(model).__mro__
    names = {f"{c.__module__}.{c.__qualname__}" for c in root}
    if "torch.nn.modules.module.Module" in names:
        return "torch"
    if any(n.startswith("paddle.") and n.endswith(".Layer") for n in names):
        return "paddle"
    return None


def _build_timm(ref: ModelRef):
    from .extras import require

    timm = require("timm", f"model spec {ref.spec}", "pairs")
    if not timm.is_model(ref.name):
        close = difflib.get_close_matches(ref.name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"timm has no model '{ref.name}'{hint}")
    return _call(ref, lambda **kw: timm.create_model(ref.name, pretrained=False, **kw))


def _build_paddleclas(ref: ModelRef):
    import paddle

    module = _paddleclas_backbones()
    factory = getattr(module, ref.name, None)
    if not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(ref.name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"PaddleClas has no backbone '{ref.name}' in {PADDLECLAS_BACKBONES}{hint}")
    # Some PaddleClas models name their parameters explicitly (ParamAttr(name=...)); a fresh
    # unique-name scope per build keeps a second build in one process from colliding.
    with paddle.utils.unique_name.guard():
        return _call(ref, factory)


def _paddleclas_backbones():
    from .extras import require

    module = require(PADDLECLAS_BACKBONES, "paddleclas: specs", "pairs")
    # ResNet50, HRNet, ... log through PaddleClas's logger and fail unless it was set up.
    importlib.import_module("paddleclas.ppcls.utils.logger").init_logger()
    return module


def _build_callable(ref: ModelRef):
    try:
        module = importlib.import_module(ref.source)
    except ImportError as exc:
        raise UserError(f"model spec {ref.spec}: cannot import module '{ref.source}' ({first_sentence(exc)})") from None
    factory = getattr(module, ref.name, None)
    if factory is None:
        raise UserError(f"model spec {ref.spec}: module '{ref.source}' has no attribute '{ref.name}'")
    if not callable(factory):
        raise UserError(f"model spec {ref.spec}: '{ref.name}' is a {type(factory).__name__}, not a callable")
    return _call(ref, factory)


def _call(ref: ModelRef, factory):
    try:
        return factory(**ref.kwargs)
    except UserError:
        raise
    except Exception as exc:  # the factory's own failure: one line naming it
        raise UserError(f"{ref}: building the model failed: {type(exc).__name__}: {first_sentence(exc, 160)}") from None


def timm_preprocessing(model) -> dict | None:
    """timm's ``pretrained_cfg`` eval settings, as a pair file's [preprocessing] records them."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "input_size" not in cfg:
        return None
    return {"input_size": int(cfg["input_size"][-1]), "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "interpolation": str(cfg.get("interpolation", "bicubic")),
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
