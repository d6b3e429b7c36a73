"""BiFormer variants: the resolved official configuration, shared by the torch reference and the
Paddle port (framework-free, so the Paddle side never imports torch).

Official sources (rayleizhu/BiFormer @ 1697bbb): ``models/biformer.py`` (tiny/small/base),
``models/biformer_stl.py`` and ``models/biformer_stl_nchw.py``.  Every value below is what the
released checkpoints were built with, including the defaults the factories do not spell out.
The dense backbones (``DENSE_CONFIGS``) are ``BiFormer_mm`` of ``object_detection/models_mm`` and
``semantic_segmentation/models_mm`` built as the COCO / ADE20K configs build them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

# Model layouts.  "biformer": conv stem, conv+BN downsampling, pos_embed conv, NHWC blocks with
# the legacy Bi-Level Routing Attention (ops/bra_legacy.py).  "stl": Swin-Tiny layout, patchify
# stem, BN+conv merging, NHWC blocks with the same legacy BRA.  "stl_nchw": the same layout with
# the refactored NCHW BRA (ops/bra_nchw.py): 1x1-conv projections, LayerNorm2d, unscaled routing.
LAYOUTS = ("biformer", "stl", "stl_nchw")


@dataclass(frozen=True)
class BiFormerConfig:
    layout: str
    depth: tuple
    embed_dim: tuple
    mlp_ratio: int
    # Regions kept per query region in stages 1-3.  A negative value means the stage uses global
    # attention with LePE instead of routing (official: -2 in the NHWC models, -1 in the NCHW one).
    topks: tuple = (1, 4, 16, -2)
    n_win: int = 7  # regions per side: every routed stage is split into 7x7 regions
    head_dim: int = 32  # routed-attention heads = dim // 32
    global_heads: int = 8  # stage-4 attention takes its default 8 heads, whatever the width
    side_dwconv: int = 5  # LePE depthwise kernel
    pos_embed_kernel: int = 3  # "biformer" layout only: depthwise conv before each block
    norm_eps: float = 1e-6  # block LayerNorms (nn.LayerNorm or timm LayerNorm2d); dense extra_norms too
    # Dense backbones (official auto_pad=True): each legacy BRA zero-pads its NHWC input bottom/right
    # to a multiple of n_win (after norm1, no mask) and crops its output back, so any size runs.
    auto_pad: bool = False
    # "biformer" layout: per-channel layer scales gamma1 / gamma2 on both residual branches when > 0
    # (biformer.py:96-101, initialised to this value).  Every official factory and dense config
    # passes -1: no layer scale, no gamma parameters.
    layer_scale_init_value: float = -1.0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown BiFormer layout {self.layout!r}; expected one of {LAYOUTS}")

    def stage_resolutions(self, size: int) -> tuple:
        """Side length of the four stage feature maps for an input side of ``size``."""
        sizes = []
        if self.layout == "biformer":  # 3x3 stride-2 padding-1 convs: ceil(size / 2) each time
            size = -(-size // 2)
            for _ in range(4):
                size = -(-size // 2)
                sizes.append(size)
        else:  # 4x4 stride-4 patchify, then 2x2 stride-2 merging: floor division
            size //= 4
            for _ in range(4):
                sizes.append(size)
                size //= 2
        return tuple(sizes)

    def input_size_problem(self, height: int, width: int) -> Optional[str]:
        """Why an input of ``height`` x ``width`` cannot be run, or None if it can.

        Each routed stage splits its feature map into n_win x n_win equal regions (the official
        legacy BRA asserts it; the NCHW one would silently pad, which this port does not
        reproduce), so every routed stage's side must be a positive multiple of n_win.
        """
        hs, ws = self.stage_resolutions(height), self.stage_resolutions(width)
        for stage, (topk, h, w) in enumerate(zip(self.topks, hs, ws), start=1):
            if topk > 0 and (h == 0 or w == 0 or h % self.n_win or w % self.n_win):
                return (f"input {height}x{width} gives a {h}x{w} feature map at stage {stage}, which does "
                        f"not split into {self.n_win}x{self.n_win} equal regions; use a height and width "
                        f"that are multiples of 112 (e.g. 224)")
        return None

    def input_problem(self, height: int, width: int) -> Optional[str]:
        """Why an input of ``height`` x ``width`` cannot be run, or None if it can: with auto_pad
        (the dense backbones) any non-empty input, otherwise ``input_size_problem``."""
        if not self.auto_pad:
            return self.input_size_problem(height, width)
        if height < 1 or width < 1:
            return f"input {height}x{width} is empty"
        return None


CONFIGS = {
    "biformer_tiny": BiFormerConfig("biformer", depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512), mlp_ratio=3),
    "biformer_small": BiFormerConfig("biformer", depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512), mlp_ratio=3),
    "biformer_base": BiFormerConfig("biformer", depth=(4, 4, 18, 4), embed_dim=(96, 192, 384, 768), mlp_ratio=3),
    "biformer_stl": BiFormerConfig("stl", depth=(2, 2, 6, 2), embed_dim=(96, 192, 384, 768), mlp_ratio=4),
    "biformer_stl_nchw": BiFormerConfig("stl_nchw", depth=(2, 2, 6, 2), embed_dim=(96, 192, 384, 768),
                                        mlp_ratio=4, topks=(1, 4, 16, -1)),
}

# Dense backbones: ``BiFormer_mm`` (object_detection/ and semantic_segmentation/
# models_mm/biformer_mm.py:12) on the classification trunk, with auto_pad=True and the configs'
# n_win: 16 in every COCO config (object_detection/configs/coco/*.py), 8 in every ADE20K
# BiFormer config (semantic_segmentation/configs/ade20k/{upernet,sfpn}.biformer_*.py).  Every
# other backbone kwarg equals the classifier's (drop_path_rate aside: DENSE_TRAINING below).
DENSE_CONFIGS = {
    "biformer_small_det": replace(CONFIGS["biformer_small"], n_win=16, auto_pad=True),
    "biformer_base_det": replace(CONFIGS["biformer_base"], n_win=16, auto_pad=True),
    "biformer_small_seg": replace(CONFIGS["biformer_small"], n_win=8, auto_pad=True),
    "biformer_base_seg": replace(CONFIGS["biformer_base"], n_win=8, auto_pad=True),
}


# ---------------------------------------------------------------------------------------------
# Training-time defaults (no effect in eval).
#
# Classifiers: the official factories leave BiFormer / BiFormerSTL / nchwBiFormerSTL at
# drop_path_rate=0. and drop_rate=0. (biformer.py:139, biformer_stl.py:121,
# biformer_stl_nchw.py:115), and so do the factories here.  ``drop_rate`` is accepted and never
# used by the official models: there is no dropout to apply (the stage-4 AttentionLePE's
# attn_drop / proj_drop are Dropout(0.) that no model argument reaches, _common.py:67-76).  The
# official ImageNet recipe passes the rate through create_model (main.py:270-277): --drop-path
# defaults to 0.1 (main.py:60, configs/train_args.yaml:7); the repo's commands use 0.15 for
# biformer_small (README.md:82, scripts/train.sh:5) and 0.1 for biformer_stl / biformer_stl_nchw
# (scripts/train.sh:13, 24) and name none for tiny / base; --drop 0.0 (main.py:58).

# Dense backbones, as the configs the registry names build them: drop_path_rate from the config
# (retinanet.1x.biformer_{small,base}.py:38 0.2 / 0.3, the maskrcnn.1x configs:42 the same;
# upernet.biformer_{small,base}.py:40 0.3 / 0.4 -- the sfpn configs use 0.15 / 0.3), and the
# detection class's ``norm_eval=True`` default (object_detection/models_mm/biformer_mm.py:13,
# 59-67): its train() keeps every BatchNorm in eval mode, so COCO fine-tuning normalises with the
# ImageNet running statistics and never updates them (their affine weights still train:
# disable_bn_grad=False, retinanet.1x.*.py:39).  The segmentation class has neither argument;
# its BatchNorms train (converted to SyncBatchNorm, biformer_mm.py:31: batch statistics over all
# GPUs, the same update as BatchNorm2d on one).
DENSE_TRAINING = {
    "biformer_small_det": {"drop_path_rate": 0.2, "norm_eval": True},
    "biformer_base_det": {"drop_path_rate": 0.3, "norm_eval": True},
    "biformer_small_seg": {"drop_path_rate": 0.3},
    "biformer_base_seg": {"drop_path_rate": 0.4},
}


def dense_factory_kwargs(name: str, kwargs: dict) -> dict:
    """What a dense factory builds ``BiFormerDense`` with: the config's training defaults
    (``DENSE_TRAINING``) under the caller's kwargs.  ``norm_eval`` / ``disable_bn_grad`` exist in
    the detection class only: the segmentation factories refuse them, as the official class does."""
    if not name.endswith("_det"):
        for key in ("norm_eval", "disable_bn_grad"):
            if key in kwargs:
                raise TypeError(f"{name}() got an unexpected keyword argument '{key}' (the official "
                                f"segmentation BiFormer_mm has no {key}; the detection one does)")
    return {**DENSE_TRAINING[name], **kwargs}
