"""CrossFormer / CrossFormer++ variants: the resolved official configuration, the size-dependent
layout rules and the index tables / masks, shared by the torch reference, the Paddle port and the
key mapping (numpy only, so the Paddle side never imports torch).

Official source: cheerss/CrossFormer @ 7952010, ``configs/crossformer*/`` (YAML) on top of the
``config.py`` defaults, built by ``models/build.py``.  The v1 YAMLs leave INTERVAL at its default
(8, 4, 2, 1) and set USE_ACL False; every ++ YAML sets group sizes (4, 4, 14, 7), intervals
(4, 2, 1, 1) and USE_ACL True.  Common to all: head_dim 32, qkv bias, no APE, patch norm,
constant group type, padding bottom/right, masks on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

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


def scale_dims(total: int, n: int) -> tuple:
    """Output channels of the ``n`` cross-scale convs sharing ``total`` channels: total/2, total/4,
    ..., and the last (largest kernel) the same as the one before it, e.g. 64 -> (32, 16, 8, 8)."""
    return tuple(total // 2 ** (i if i == n - 1 else i + 1) for i in range(n))


# DPB index tables and padding masks: numpy, built once per block and registered by both models.

def coordinate_table(group_size: int) -> np.ndarray:
    """All relative offsets (dh, dw) in [1-G, G-1]^2, dh-major: ((2G-1)^2, 2) float32."""
    r = np.arange(1 - group_size, group_size)
    return np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float32)


def relative_position_index(group_size: int) -> np.ndarray:
    """Row of ``coordinate_table`` holding the offset from token j to token i of a group: (G^2, G^2) int64."""
    g = np.arange(group_size)
    coords = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    rel = coords[:, None, :] - coords[None, :, :] + (group_size - 1)
    return (rel[..., 0] * (2 * group_size - 1) + rel[..., 1]).astype(np.int64)


def padding_mask(resolution: tuple, layout: BlockLayout) -> Optional[np.ndarray]:
    """(nG, G*G, G*G) float32 additive mask, NEG_INF on the key columns that are padding and 0
    elsewhere; None without padding.  Groups are ordered as the models' ``group_tokens`` orders them."""
    if not (layout.pad_h or layout.pad_w):
        return None
    (H, W), G, I = resolution, layout.group_size, layout.group_interval
    Hp, Wp = H + layout.pad_h, W + layout.pad_w
    padded = (np.arange(Hp)[:, None] >= H) | (np.arange(Wp)[None, :] >= W)
    # group_tokens without batch and channel axes: (rows, g, i) x (cols, g, i) -> (rows, cols, i, i, g, g)
    keys = padded.reshape(Hp // (G * I), G, I, Wp // (G * I), G, I).transpose(0, 3, 2, 5, 1, 4)
    keys = keys.reshape(-1, 1, G * G)  # (nG, 1, G*G): one row of key flags per group
    mask = np.zeros((keys.shape[0], G * G, G * G), dtype=np.float32)
    mask[np.broadcast_to(keys, mask.shape)] = NEG_INF
    return mask
