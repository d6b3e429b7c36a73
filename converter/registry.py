"""Every model torch2paddle knows, as data.

A variant is a name (plus aliases), a family, and the official eval
preprocessing.  A family names its torch reference module, its Paddle module,
its mapping table, the checkpoint entries its official loader reads, and the
input sizes its models accept.  A dense-prediction backbone (``fcvit_b12_feat``,
``crossformer_small_det``, ...) is a variant too, with a ``DenseSpec``: the official
code it reproduces, its output channels and strides, and the detector/segmentor
checkpoint it comes in.  ``list``, the CLI, the Python API and the tests all
iterate over ``MODELS``.

Importing this module imports neither torch nor paddle.
"""
from __future__ import annotations

import difflib
import importlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalPreprocessing:
    """Official eval transform: resize shorter side to floor(size / crop_pct), center-crop size."""

    crop_pct: float
    input_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def resize_shorter_side(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def describe(self) -> str:
        return (f"resize {self.resize_shorter_side} {self.interpolation}, "
                f"crop {self.input_size} (crop_pct {self.crop_pct:g})")


def _any_size(h: int, w: int) -> Optional[str]:
    return None


def _multiple_of(n: int, why: str) -> Callable[[int, int], Optional[str]]:
    def check(h: int, w: int) -> Optional[str]:
        if h % n or w % n:
            return f"input {h}x{w} is not a multiple of {n} ({why})"
        return None
    return check


@dataclass(frozen=True)
class Family:
    name: str
    # Container entries the official loader reads, in its order of preference.
    checkpoint_entries: tuple
    # Returns an error message for an input size the models cannot take.
    input_check: Callable[[int, int], Optional[str]] = _any_size
    # The models are built for one input size (their factories take img_size).
    size_dependent: bool = False

    @property
    def torch_module(self) -> str:
        return f"reference_torch.{self.name}"

    @property
    def paddle_module(self) -> str:
        return f"paddle_models.{self.name}"

    @property
    def mapping_module(self) -> str:
        return f"mappings.{self.name}"


FCVIT = Family("fcvit", checkpoint_entries=("state_dict", "model"))  # timm load_checkpoint order
BIFORMER = Family("biformer", checkpoint_entries=("model",),
                  input_check=_multiple_of(112, "BiFormer splits stages 1-3 into 7x7 regions at strides 4, 8, 16"))
CROSSFORMER = Family("crossformer", checkpoint_entries=("model",), size_dependent=True,
                     input_check=lambda h, w: importlib.import_module("model_configs.crossformer")
                     .input_size_problem(h, w))  # framework-free: square, a multiple of 32
REGIONVIT = Family("regionvit", checkpoint_entries=("model",))


# The released detector / segmentor checkpoints a dense backbone comes in: the container entry
# holding the state dict, and the prefix its backbone keys carry there.
DETECTOR_FILES = {
    "mmdet": ("state_dict", "backbone."),  # mmcv save_checkpoint: {'meta', 'state_dict', 'optimizer'}
    "mmseg": ("state_dict", "backbone."),
    "detectron2": ("model", "backbone.bottom_up.model."),  # {'model', 'iteration', ...}
}
STRIDES = (4, 8, 16, 32)
# verify's default inputs for a dense backbone: non-square, and at stride 4 (64x88, 96x128) neither
# side a multiple of BiFormer's 16 or 8 windows, CrossFormer's 7-groups or RegionViT's 28-pixel regions.
DENSE_VERIFY_SIZES = ((256, 352), (384, 512))


@dataclass(frozen=True)
class DenseSpec:
    """A dense-prediction backbone: what it reproduces and what it returns."""

    channels: tuple  # output channels of stages 1..4 (strides 4, 8, 16, 32)
    classifier: str  # the classification variant whose ImageNet checkpoint initialises it
    framework: str  # the released checkpoints' format: a key of DETECTOR_FILES
    detector: str  # the head the fixtures put beside it (converter.fixtures.DETECTOR_HEADS)
    source: str  # official file, class and commit
    config: str  # the official config it is built as

    @property
    def strides(self) -> tuple:
        return STRIDES[:len(self.channels)]

    @property
    def checkpoint_entry(self) -> str:
        return DETECTOR_FILES[self.framework][0]

    @property
    def checkpoint_prefix(self) -> str:
        return DETECTOR_FILES[self.framework][1]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    preprocessing: EvalPreprocessing
    aliases: tuple = ()
    # The factory name in the model modules when it differs from ``name``.
    factory: str = ""
    extra_kwargs: dict = field(default_factory=dict)
    dense: Optional[DenseSpec] = None

    def _factory(self, module_name: str) -> Callable:
        module = importlib.import_module(module_name)
        return getattr(module, self.factory or self.name)

    @property
    def checkpoint_entries(self) -> tuple:
        """Container entries the official loader reads, in its order of preference (a dense
        backbone: its detector file's entry first, then the classifier's, for ImageNet weights)."""
        if self.dense:
            return (self.dense.checkpoint_entry,) + tuple(
                e for e in self.family.checkpoint_entries if e != self.dense.checkpoint_entry)
        return self.family.checkpoint_entries

    def factory_kwargs(self, num_classes: int = 1000, img_size: Optional[int] = None) -> dict:
        """What both frameworks' factories are called with (the models depend on nothing else).
        A dense backbone has no classes and takes any accepted input size at run time."""
        if self.dense:
            return dict(self.extra_kwargs)
        if img_size is not None:
            self.check_input_size(img_size, img_size)
        kwargs = dict(self.extra_kwargs, num_classes=num_classes)
        if self.family.size_dependent:
            kwargs["img_size"] = img_size or self.preprocessing.input_size
        return kwargs

    def create_torch(self, num_classes: int = 1000, img_size: Optional[int] = None, **model_kwargs):
        """The torch reference; ``model_kwargs`` go to the factory as they are (``out_indices``, ...)."""
        return self._factory(self.family.torch_module)(**self.factory_kwargs(num_classes, img_size), **model_kwargs)

    def create_paddle(self, num_classes: int = 1000, img_size: Optional[int] = None, **model_kwargs):
        """The Paddle model; ``model_kwargs`` go to the factory as they are (``out_indices``, ...)."""
        return self._factory(self.family.paddle_module)(**self.factory_kwargs(num_classes, img_size), **model_kwargs)

    @property
    def rules(self) -> tuple:
        """The family's table, or a variant's own where its keys mean other layers (BiFormer's
        STL-nchw names 1x1 convs what STL names Linears)."""
        module = importlib.import_module(self.family.mapping_module)
        return getattr(module, "VARIANT_RULES", {}).get(self.name, module.RULES)

    @property
    def from_classifier_rules(self) -> tuple:
        """A dense backbone started from an ImageNet classification checkpoint: the rules added to
        ``rules`` (classifier-only keys dropped, the backbone's extra norms initialised)."""
        return importlib.import_module(self.family.mapping_module).FROM_CLASSIFIER

    def check_input_size(self, h: int, w: int) -> None:
        if self.dense:
            config = importlib.import_module(f"model_configs.{self.family.name}").DENSE_CONFIGS[self.name]
            problem = config.input_problem(h, w)
        else:
            problem = self.family.input_check(h, w)
        if problem:
            raise UserError(f"{self.name}: {problem}")


def _variants(family: Family, crop: dict, aliases: Callable[[str], tuple] = lambda n: ()) -> list:
    return [ModelSpec(name, family, EvalPreprocessing(crop_pct=c), aliases=aliases(name))
            for name, c in crop.items()]


def _dense(family: Family, name: str, classifier: str, channels: tuple, framework: str, detector: str,
           source: str, config: str) -> ModelSpec:
    """A dense backbone; ``--images`` go through its classifier's eval normalisation."""
    classifier_spec = next(s for s in _CLASSIFIERS if s.name == classifier)
    return ModelSpec(name, family, classifier_spec.preprocessing,
                     dense=DenseSpec(tuple(channels), classifier, framework, detector, source, config))


_CLASSIFIERS = tuple(
    _variants(FCVIT, {"fcvit_tiny": 0.90, "fcvit_b12": 0.90, "fcvit_b24": 0.95, "fcvit_b48": 0.95})
    + _variants(BIFORMER, dict.fromkeys(
        ["biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw"], 0.875))
    + _variants(CROSSFORMER, dict.fromkeys(
        ["crossformer_tiny", "crossformer_small", "crossformer_base", "crossformer_large",
         "crossformer_pp_small", "crossformer_pp_base", "crossformer_pp_large", "crossformer_pp_huge"], 0.875))
    + _variants(REGIONVIT, dict.fromkeys(
        ["regionvit_tiny", "regionvit_small", "regionvit_medium", "regionvit_base", "regionvit_small_w14",
         "regionvit_small_w14_peg", "regionvit_base_w14", "regionvit_base_w14_peg"], 0.875),
        aliases=lambda n: (f"{n}_224",))
)

_FCVIT = "ma-xu/FCViT@77e5a9d"
_BIFORMER = "rayleizhu/BiFormer@1697bbb"
_CROSSFORMER_V1 = "cheerss/CrossFormer@4fbf750 (v1, the released dense weights' code)"
_CROSSFORMER_HEAD = "cheerss/CrossFormer@7952010"
_REGIONVIT = "IBM/RegionViT@77000c2"
_C64, _C96, _C128 = (64, 128, 256, 512), (96, 192, 384, 768), (128, 256, 512, 1024)  # channels by stage


def _biformer(size: str, task: str, channels: tuple) -> ModelSpec:
    det = task == "det"
    where, config = (("object_detection", f"configs/coco/retinanet.1x.biformer_{size}.py (n_win 16)") if det else
                     ("semantic_segmentation", f"configs/ade20k/upernet.biformer_{size}.py (n_win 8)"))
    return _dense(BIFORMER, f"biformer_{size}_{task}", f"biformer_{size}", channels, "mmdet" if det else "mmseg",
                  "retinanet" if det else "upernet", f"{_BIFORMER} {where}/models_mm/biformer_mm.py:12 BiFormer_mm",
                  f"{where}/{config}")


def _regionvit(variant: str, channels: tuple) -> ModelSpec:
    return _dense(REGIONVIT, f"{variant}_det", variant, channels, "detectron2", "d2_mask_rcnn",
                  f"{_REGIONVIT} detection/detector_wrapper.py:10 RegionViTBackbone({variant}_224, det_norm)",
                  f"detection/configs/mask_rcnn_regionvit_FPN_1x.yaml + REGIONVIT {variant}_224")


DENSE_MODELS = (
    _dense(FCVIT, "fcvit_b12_feat", "fcvit_b12", (64, 128, 320, 512), "mmdet", "mask_rcnn",
           f"{_FCVIT} models/fcvit.py:705 fcvit_b12_feat", "detection/configs/mask_rcnn_fcvit_b12_fpn_1x_coco.py"),
    _dense(FCVIT, "fcvit_b24_feat", "fcvit_b24", (64, 128, 320, 512), "mmdet", "mask_rcnn",
           f"{_FCVIT} models/fcvit.py:676 fcvit_b24_feat", "detection/configs/mask_rcnn_fcvit_b24_fpn_1x_coco.py"),
    _biformer("small", "det", _C64),
    _biformer("base", "det", _C96),
    _biformer("small", "seg", _C64),
    _biformer("base", "seg", _C96),
    _dense(CROSSFORMER, "crossformer_small_det", "crossformer_small", _C96, "mmdet", "retinanet",
           f"{_CROSSFORMER_V1} detection/crossformer_factory.py:15 CrossFormer_S",
           "detection/configs/retinanet_crossformer_s_fpn_1x_coco.py"),
    _dense(CROSSFORMER, "crossformer_base_det", "crossformer_base", _C96, "mmdet", "retinanet",
           f"{_CROSSFORMER_V1} detection/crossformer_factory.py:38 CrossFormer_B",
           "detection/configs/retinanet_crossformer_b_fpn_1x_coco.py"),
    _dense(CROSSFORMER, "crossformer_large_seg", "crossformer_large", _C128, "mmseg", "semantic_fpn",
           f"{_CROSSFORMER_V1} segmentation/crossformer_factory.py:61 CrossFormer_L",
           "segmentation/configs/fpn_crossformer_l_ade20k_40k.py"),
    _dense(CROSSFORMER, "crossformer_pp_small_det", "crossformer_pp_small", _C64, "mmdet", "retinanet",
           f"{_CROSSFORMER_HEAD} detection/crossformer_factory.py:40 CrossFormer_S2",
           "detection/configs/crossformer_pp/retinanet_crossformerpp_s_fpn_1x_coco.py"),
    _regionvit("regionvit_small", _C96),
    _regionvit("regionvit_small_w14", _C96),
    _regionvit("regionvit_small_w14_peg", _C96),
    _regionvit("regionvit_base", _C128),
    _regionvit("regionvit_base_w14", _C128),
    _regionvit("regionvit_base_w14_peg", _C128),
)

MODELS: dict = {}
for _spec in _CLASSIFIERS + DENSE_MODELS:
    MODELS[_spec.name] = _spec

ALIASES = {alias: spec.name for spec in MODELS.values() for alias in spec.aliases}


PLUGIN_GROUP = "torch2paddle.models"
_plugins_loaded = False


def register(spec) -> None:
    """Add a spec with ``ModelSpec``'s interface (a pair file's ``PairSpec``, a plug-in's own) to
    ``MODELS``.  A built-in model's name cannot be taken; a pair loaded again replaces itself."""
    current = MODELS.get(spec.name)
    if current is not None and current is not spec:
        if isinstance(current, ModelSpec) or getattr(current, "path", None) != getattr(spec, "path", None):
            where = getattr(current, "path", None) or "built in"
            raise UserError(f"model name '{spec.name}' is taken ({where}); give the pair another name "
                            f"([pair] name = ...)")
    MODELS[spec.name] = spec
    for alias in getattr(spec, "aliases", ()):
        ALIASES[alias] = spec.name


def register_pairs(path) -> list:
    """Register a pair file, or every ``*.toml`` in a directory; returns their specs."""
    from pathlib import Path

    from .pairs import load_pair_file

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise UserError(f"{path}: no pair files (*.toml) in this directory")
    else:
        files = [path]
    specs = [load_pair_file(f) for f in files]
    for spec in specs:
        register(spec)
    return specs


def load_plugins(refresh: bool = False) -> None:
    """Register what installed packages offer under the ``torch2paddle.models`` entry point: each
    entry point names a callable (or a value) giving an iterable of pair-file paths, directories of
    pair files, or spec objects with ``ModelSpec``'s interface."""
    global _plugins_loaded
    if _plugins_loaded and not refresh:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            offered = ep.load()
            items = offered() if callable(offered) else offered
            for item in items:
                if isinstance(item, (str, os.PathLike)):
                    register_pairs(item)
                else:
                    register(item)
        except UserError as exc:
            raise UserError(f"plug-in '{ep.name}' ({ep.value}): {exc}") from None
        except Exception as exc:
            raise UserError(f"plug-in '{ep.name}' ({ep.value}) failed: {type(exc).__name__}: {exc}") from None


def all_models() -> dict:
    """``MODELS`` with the plug-ins' entries."""
    load_plugins()
    return MODELS


def get_spec(name: str) -> ModelSpec:
    """The spec for a model name or alias, or a pair file (``*.toml``); unknown names get close
    suggestions."""
    if str(name).endswith(".toml"):
        return register_pairs(name)[0]
    canonical = ALIASES.get(name, name)
    if canonical in MODELS:
        return MODELS[canonical]
    load_plugins()
    canonical = ALIASES.get(name, name)
    if canonical in MODELS:
        return MODELS[canonical]
    close = difflib.get_close_matches(name, list(MODELS) + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run 'torch2paddle list' for all models"
    raise UserError(f"unknown model '{name}'{hint}")
