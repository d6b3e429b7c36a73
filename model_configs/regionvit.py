"""RegionViT variants and the index tables / masks both frameworks build from (numpy only,
so the Paddle port never imports torch).  Official code IBM/RegionViT @ 77000c2."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np


@dataclass(frozen=True)
class RegionViTConfig:
    embed_dim: tuple
    depth: tuple
    num_heads: tuple
    window_size: int
    patch_conv_type: str
    peg: bool = False


# Training: the official factories pass nothing, so RegionViT.__init__'s defaults hold
# (regionvit.py:295-296): drop_rate 0, attn_drop_rate 0, drop_path_rate 0.  The ImageNet recipe
# overrides them from the command line: --drop-path 0.1 (main.py:45), --drop 0 (main.py:43).
IMAGENET_DROP_PATH_RATE = 0.1

CONFIGS = {
    "regionvit_tiny": RegionViTConfig((64, 64, 128, 256, 512), (2, 2, 8, 2), (2, 4, 8, 16), 7, "3conv"),
    "regionvit_small": RegionViTConfig((96, 96, 192, 384, 768), (2, 2, 8, 2), (3, 6, 12, 24), 7, "3conv"),
    "regionvit_medium": RegionViTConfig((96, 96, 192, 384, 768), (2, 2, 14, 2), (3, 6, 12, 24), 7, "1conv"),
    "regionvit_base": RegionViTConfig((128, 128, 256, 512, 1024), (2, 2, 14, 2), (4, 8, 16, 32), 7, "1conv"),
    "regionvit_small_w14": RegionViTConfig((96, 96, 192, 384, 768), (2, 2, 8, 2), (3, 6, 12, 24), 14, "3conv"),
    "regionvit_small_w14_peg": RegionViTConfig((96, 96, 192, 384, 768), (2, 2, 8, 2), (3, 6, 12, 24), 14, "3conv", peg=True),
    "regionvit_base_w14": RegionViTConfig((128, 128, 256, 512, 1024), (2, 2, 14, 2), (4, 8, 16, 32), 14, "1conv"),
    "regionvit_base_w14_peg": RegionViTConfig((128, 128, 256, 512, 1024), (2, 2, 14, 2), (4, 8, 16, 32), 14, "1conv", peg=True),
}


# Dense (detection) backbones: detection/detector_wrapper.py:10 RegionViTBackbone, which builds the
# classifier with det_norm=True (regionvit.py:346-351, 379-395) and deletes its `norm` and `head`.

@dataclass(frozen=True)
class RegionViTDenseConfig:
    """One RegionViTBackbone: ``model`` (the classifier it wraps, by its timm name without ``_224``)
    with ``det_norm``: a LayerNorm2d ``norm{i}`` on the local tokens after stage i, whose output is
    both the i-th feature map and the next stage's input.  ``drop_path_rate`` (MODEL.BACKBONE.DP_RATE:
    0.2 in detection/config.py:9 and every detection config, e.g. mask_rcnn_regionvit_FPN_1x.yaml:7;
    the wrapper passes it to the classifier's factory, detector_wrapper.py:14) and ``freeze_at``
    only matter in training."""

    model: str
    det_norm: bool = True
    drop_path_rate: float = 0.2
    freeze_at: int = 0

    @property
    def backbone(self) -> RegionViTConfig:
        return CONFIGS[self.model]

    @property
    def out_channels(self) -> tuple:
        return tuple(self.backbone.embed_dim[1:])

    strides: ClassVar[tuple] = (4, 8, 16, 32)

    def input_problem(self, height: int, width: int) -> Optional[str]:
        """None when the official dense code runs on ``height`` x ``width`` (there is no size
        assert; the regional stem pads, the local tokens pad and mask), else why not: the 1conv
        stem (kernel 8, stride 4, padding 3) has no output below 2 pixels."""
        smallest = 2 if self.backbone.patch_conv_type == "1conv" else 1
        if height < smallest or width < smallest:
            return f"input {height}x{width} is smaller than {smallest}x{smallest} (the official stem has no output)"
        return None


# The "+" models of the paper's detection tables are the w14 variants.
DENSE_CONFIGS = {
    f"{name}_det": RegionViTDenseConfig(name)
    for name in ("regionvit_small", "regionvit_small_w14", "regionvit_small_w14_peg",
                 "regionvit_base", "regionvit_base_w14", "regionvit_base_w14_peg")
}


def regional_padding(height: int, width: int, patch: int) -> tuple:
    """(left, right, top, bottom) zeros the regional-token stem adds to the image (official
    PatchEmbed.forward with extra_padding, regionvit.py:61-72).  Only when an axis is not a
    multiple of ``patch``; then BOTH axes pad by ``patch - size % patch``, split floor / ceil
    around the image, so an axis that was already a multiple gains a whole patch (as the
    official code does: 224x300 pads to 252x308, a 9x11 regional grid)."""
    if height % patch == 0 and width % patch == 0:
        return (0, 0, 0, 0)
    pad_w, pad_h = patch - width % patch, patch - height % patch
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


# Index tables and masks: numpy, vectorised, cached per size.

@functools.lru_cache(maxsize=None)
def rel_pos_index(ws: int) -> np.ndarray:
    """Index into ``rel_pos[:, :]`` for every (query, key) pair of a ws x ws window.

    Flattened as (y, x, dy, dx) with query (y, x) and key (dy, dx).  The official
    table is ``arange(R * R).reshape(R, R)[dy - y + ws // 2, dx - x + ws // 2]`` with
    R = 2 * ws - 1 and Python's negative-index wrap-around, i.e. modulo R.
    """
    size = 2 * ws - 1
    pos = np.arange(ws)
    offset = (pos[None, :] - pos[:, None] + ws // 2) % size  # [query, key] along one axis
    index = offset[:, None, :, None] * size + offset[None, :, None, :]  # (y, x, dy, dx)
    index = index.reshape(-1).astype(np.int64)
    index.setflags(write=False)
    return index


@functools.lru_cache(maxsize=None)
def window_mask(rows: int, cols: int, ws: int, pad_b: int, pad_r: int) -> np.ndarray:
    """Blocked (True) attention entries per window, shape (rows * cols, 1 + ws^2, 1 + ws^2).

    Token 0 of a window is its regional token; local token t sits at (t // ws, t % ws).
    Windows are row-major.  The official construction, reproduced exactly:
    * windows in the last column (except the last row): query and key both in a
      valid column;
    * windows in the last row: query and key both in a valid row;
    * the bottom-right window: the union of the two (the official code starts
      from the column mask and opens the whole valid-row block), so a valid query
      still sees right- and bottom-padded keys; only corner keys are blocked;
    * every other window: nothing blocked.
    """
    local = np.arange(ws * ws)
    col_ok = np.concatenate([[True], local % ws < ws - pad_r])
    row_ok = np.concatenate([[True], local // ws < ws - pad_b])
    right = col_ok[:, None] & col_ok[None, :]
    bottom = row_ok[:, None] & row_ok[None, :]
    last_row = (np.arange(rows) == rows - 1)[:, None]
    last_col = (np.arange(cols) == cols - 1)[None, :]
    kind = (last_row.astype(np.int64) * 2 + last_col).reshape(-1)  # 0 inner, 1 right, 2 bottom, 3 corner
    allowed = np.stack([np.ones_like(right), right, bottom, right | bottom])[kind]
    blocked = ~allowed
    blocked.setflags(write=False)
    return blocked
