"""PaddleSeg plug-in: ``import paddle_models.paddleseg_backbones`` adds one backbone per family to
PaddleSeg's ``manager.BACKBONES``, so a segmentation config can name it::

    model:
      type: UPerNet
      backbone:
        type: CrossFormer
        arch: crossformer_small_det                  # a dense name of the family
        pretrained: crossformer_small_det.pdparams   # written by `torch2paddle convert`
      backbone_indices: [0, 1, 2, 3]                 # indices into out_indices' outputs

The components are ``FCViT``, ``BiFormer``, ``CrossFormer`` and ``RegionViT``.  Each is the
family's Paddle dense model itself (a subclass of its ``DENSE_MODEL``, no extra layers), so its
state-dict keys are the converted ``.pdparams`` keys, which PaddleSeg's own loader
(``paddleseg.utils.load_pretrained_model``, exact key match) needs.  Keyword arguments other than
``arch`` / ``out_indices`` / ``in_channels`` / ``pretrained`` go to the dense model's constructor.

Works with paddleseg 2.8.0 installed with ``--no-deps`` next to ``torch2paddle[suites]``.
"""
from __future__ import annotations

try:
    from paddleseg.cvlibs import manager
    from paddleseg.utils import load_pretrained_model
except ImportError as err:  # one line that says what to install
    raise ImportError(
        f"paddle_models.paddleseg_backbones needs PaddleSeg, which could not be imported ({err}); "
        "install: pip install 'torch2paddle[suites]' && pip install --no-deps paddleseg==2.8.0") from None

from .suite_backbones import DenseBackbone, dense_model

__all__ = ["FCViT", "BiFormer", "CrossFormer", "RegionViT"]


class _SegmentationBackbone(DenseBackbone):
    """What PaddleSeg asks of a backbone, over a family's dense model (the next class in the MRO)."""

    def __init__(self, arch, out_indices=(0, 1, 2, 3), in_channels=3, pretrained=None, **kwargs):
        if in_channels != 3:  # PaddleSeg sets it from the dataset's IMG_CHANNELS
            raise ValueError(f"{type(self).__name__}: {arch} takes 3-channel (RGB) images, not {in_channels}")
        super().__init__(arch, out_indices, **kwargs)
        self.feat_channels = [info["channels"] for info in self.feature_info]
        self.pretrained = pretrained
        if pretrained is not None:
            load_pretrained_model(self, pretrained)

    def forward(self, x):
        return self.features(x)


@manager.BACKBONES.add_component
class FCViT(_SegmentationBackbone, dense_model("fcvit")):
    """FCViT dense backbone (``arch``: fcvit_b12_feat, fcvit_b24_feat)."""
    _family = "fcvit"


@manager.BACKBONES.add_component
class BiFormer(_SegmentationBackbone, dense_model("biformer")):
    """BiFormer dense backbone (``arch``: biformer_small_seg, biformer_base_seg, ...)."""
    _family = "biformer"


@manager.BACKBONES.add_component
class CrossFormer(_SegmentationBackbone, dense_model("crossformer")):
    """CrossFormer dense backbone (``arch``: crossformer_small_det, crossformer_large_seg, ...)."""
    _family = "crossformer"


@manager.BACKBONES.add_component
class RegionViT(_SegmentationBackbone, dense_model("regionvit")):
    """RegionViT dense backbone (``arch``: regionvit_small_det, ...)."""
    _family = "regionvit"
