"""PaddleDetection plug-in: ``import paddle_models.paddledet_backbones`` registers one backbone
per family with ppdet's workspace, so a detector config can name it::

    architecture: RetinaNet
    pretrain_weights: crossformer_small_det.pdparams   # written by `torch2paddle convert`
    RetinaNet:
      backbone: CrossFormer
      neck: FPN
      head: RetinaHead
    CrossFormer:
      arch: crossformer_small_det       # a dense name of the family
      out_indices: [1, 2, 3]            # stages 0..3 = strides 4, 8, 16, 32

The registered classes are ``FCViT``, ``BiFormer``, ``CrossFormer`` and ``RegionViT``.  Each is
the family's Paddle dense model itself (a subclass of its ``DENSE_MODEL``, no extra layers), so
its state-dict keys are the converted ``.pdparams`` keys and ppdet's ``pretrain_weights`` loader,
which matches keys by suffix, loads the file into ``backbone.*`` unchanged.  Keyword arguments
other than ``arch`` / ``out_indices`` go to the dense model's constructor.

Works with paddledet 2.6.0 installed with ``--no-deps`` next to ``torch2paddle[suites]``.
"""
from __future__ import annotations

import importlib

try:
    from ppdet.core.workspace import register, serializable
    from ppdet.modeling.shape_spec import ShapeSpec
except ImportError as err:  # one line that says what to install
    raise ImportError(
        f"paddle_models.paddledet_backbones needs PaddleDetection, which could not be imported ({err}); "
        "install: pip install 'torch2paddle[suites]' && pip install --no-deps paddledet==2.6.0") from None

__all__ = ["FCViT", "BiFormer", "CrossFormer", "RegionViT"]


def _dense_model(family: str):
    return importlib.import_module(f"paddle_models.{family}").DENSE_MODEL


class _DetectionBackbone:
    """What ppdet asks of a backbone, over a family's dense model (the next class in the MRO)."""

    _family = ""  # the module name in paddle_models / model_configs

    def __init__(self, arch, out_indices=(0, 1, 2, 3), **kwargs):
        configs = importlib.import_module(f"model_configs.{self._family}").DENSE_CONFIGS
        if arch not in configs:
            raise ValueError(f"{type(self).__name__}: arch '{arch}' is not a {type(self).__name__} dense backbone; "
                             f"choose one of {', '.join(sorted(configs))}")
        super().__init__(configs[arch], out_indices=tuple(out_indices), **kwargs)
        self.arch = arch
        self.dense_config = configs[arch]

    def forward(self, inputs):
        x = inputs["image"] if isinstance(inputs, dict) else inputs
        height, width = x.shape[-2:]
        if height > 0 and width > 0:  # -1 while tracing with a dynamic shape
            problem = self.dense_config.input_problem(height, width)
            if problem:
                raise ValueError(f"{self.arch}: {problem}")
        return list(super().forward(x))

    @property
    def out_shape(self):
        return [ShapeSpec(channels=info["channels"], stride=info["stride"]) for info in self.feature_info]


@register
@serializable
class FCViT(_DetectionBackbone, _dense_model("fcvit")):
    """FCViT dense backbone (``arch``: fcvit_b12_feat, fcvit_b24_feat)."""
    _family = "fcvit"


@register
@serializable
class BiFormer(_DetectionBackbone, _dense_model("biformer")):
    """BiFormer dense backbone (``arch``: biformer_small_det, biformer_base_det, ...)."""
    _family = "biformer"


@register
@serializable
class CrossFormer(_DetectionBackbone, _dense_model("crossformer")):
    """CrossFormer dense backbone (``arch``: crossformer_small_det, crossformer_base_det, ...)."""
    _family = "crossformer"


@register
@serializable
class RegionViT(_DetectionBackbone, _dense_model("regionvit")):
    """RegionViT dense backbone (``arch``: regionvit_small_det, regionvit_small_w14_det, ...)."""
    _family = "regionvit"
