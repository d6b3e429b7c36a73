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

try:
    from ppdet.core.workspace import register, serializable
    from ppdet.modeling.shape_spec import ShapeSpec
except ImportError as err:  # one line that says what to install
    raise ImportError(
        f"paddle_models.paddledet_backbones needs PaddleDetection, which could not be imported ({err}); "
        "install: pip install 'torch2paddle[suites]' && pip install --no-deps paddledet==2.6.0") from None

from .suite_backbones import DenseBackbone, dense_model

__all__ = ["FCViT", "BiFormer", "CrossFormer", "RegionViT"]


class _DetectionBackbone(DenseBackbone):
    """What ppdet asks of a backbone, over a family's dense model (the next class in the MRO)."""

    def forward(self, inputs):
        return self.features(inputs["image"] if isinstance(inputs, dict) else inputs)

    @property
    def out_shape(self):
        return [ShapeSpec(channels=info["channels"], stride=info["stride"]) for info in self.feature_info]


@register
@serializable
class FCViT(_DetectionBackbone, dense_model("fcvit")):
    """FCViT dense backbone (``arch``: fcvit_b12_feat, fcvit_b24_feat)."""
    _family = "fcvit"


@register
@serializable
class BiFormer(_DetectionBackbone, dense_model("biformer")):
    """BiFormer dense backbone (``arch``: biformer_small_det, biformer_base_det, ...)."""
    _family = "biformer"


@register
@serializable
class CrossFormer(_DetectionBackbone, dense_model("crossformer")):
    """CrossFormer dense backbone (``arch``: crossformer_small_det, crossformer_base_det, ...)."""
    _family = "crossformer"


@register
@serializable
class RegionViT(_DetectionBackbone, dense_model("regionvit")):
    """RegionViT dense backbone (``arch``: regionvit_small_det, regionvit_small_w14_det, ...)."""
    _family = "regionvit"
