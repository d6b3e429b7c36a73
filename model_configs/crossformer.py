"""CrossFormer / CrossFormer++ variants: the resolved official configuration and the size-dependent
layout rules, shared by the torch reference and the Paddle port (framework-free, so the Paddle side
never imports torch).

Official source: cheerss/CrossFormer @ 7952010, ``configs/crossformer*/`` (YAML) on top of the
``config.py`` defaults, built by ``models/build.py``.  The v1 YAMLs leave INTERVAL at its default
(8, 4, 2, 1) and set USE_ACL False; every ++ YAML sets group sizes (4, 4, 14, 7), intervals
(4, 2, 1, 1) and USE_ACL True.  Common to all: head_dim 32, qkv bias, no APE, patch norm,
constant group type, padding bottom/right, masks on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

NEG_INF = -1000000.0  # additive mask for padded keys (the official constant, not -inf)
SIZE_MULTIPLE = 32  # patch stride 4, then three stride-2 merges that need even maps


@dataclass(frozen=True)
class CrossFormerConfig:
    embed_dim: int
    depths: tuple
    num_heads: tuple
    group_size: tuple = (7, 7, 7, 7)
    interval: tuple = (8, 4, 2, 1)  # LDA sampling interval per stage
    use_acl: bool = False  # CrossFormer++ activation cooling layer
    patch_size: tuple = (4, 8, 16, 32)  # cross-scale stem kernels (stride = the first)
    merge_size: tuple = ((2, 4), (2, 4), (2, 4))  # cross-scale merge kernels (stride 2)
    mlp_ratio: float = 4.0


_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), use_acl=True)
CONFIGS = {
    "crossformer_tiny": CrossFormerConfig(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16)),
    "crossformer_small": CrossFormerConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "crossformer_base": CrossFormerConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "crossformer_large": CrossFormerConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "crossformer_pp_small": CrossFormerConfig(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), **_PP),
    "crossformer_pp_base": CrossFormerConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_PP),
    "crossformer_pp_large": CrossFormerConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_PP),
    "crossformer_pp_huge": CrossFormerConfig(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), **_PP),
}


def input_size_problem(height: int, width: int) -> Optional[str]:
    """Why a model cannot be built for (and fed) ``height`` x ``width`` images, or None.

    The stem has stride 4 and the three merges halve the map, asserting it is even, so the side
    must be a multiple of 32 (the official code would also take 32k+1..32k+3 by silently dropping
    the last rows and columns; we refuse those).  The model is built for one square size."""
    if height != width:
        return f"input {height}x{width} is not square (CrossFormer is built for one img_size x img_size)"
    if height < SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        return (f"input {height}x{width} is not a positive multiple of {SIZE_MULTIPLE} "
                f"(patch stride 4, then three stride-2 merges that need even feature maps)")
    return None


def check_img_size(img_size) -> None:
    """Raise ValueError for an ``img_size`` the model cannot be built for."""
    if not isinstance(img_size, int):
        raise ValueError(f"CrossFormer img_size must be an int, got {img_size!r}")
    problem = input_size_problem(img_size, img_size)
    if problem:
        raise ValueError(f"CrossFormer cannot be built for img_size={img_size}: {problem}")


@dataclass(frozen=True)
class BlockLayout:
    """How one block groups its (H, W) map, as the official code derives it from the resolution."""

    group_size: int
    lsda_flag: int  # 0: SDA (adjacent G x G windows), 1: LDA (G x G grids sampled every I tokens)
    group_interval: int  # stride between the tokens of a group: the LDA interval, or 1 for SDA
    pad_h: int  # zero rows added at the bottom so that G * stride divides the map
    pad_w: int  # zero columns added at the right


def block_layout(resolution: tuple, group_size: int, interval: int, lsda_flag: int) -> BlockLayout:
    if min(resolution) <= group_size:  # one group covers the whole map: plain global SDA
        group_size, lsda_flag = min(resolution), 0
    stride = interval if lsda_flag else 1
    size_div = group_size * stride
    pad_h, pad_w = ((size_div - side % size_div) % size_div for side in resolution)
    return BlockLayout(group_size, lsda_flag, stride, pad_h, pad_w)
