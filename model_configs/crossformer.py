"""CrossFormer / CrossFormer++ variants: the resolved official configuration, the size-dependent
layout rules and the index tables / masks, shared by the torch reference, the Paddle port and the
key mapping (numpy only, so the Paddle side never imports torch).

Official source: cheerss/CrossFormer @ 7952010, ``configs/crossformer*/`` (YAML) on top of the
``config.py`` defaults, built by ``models/build.py``.  The v1 YAMLs leave INTERVAL at its default
(8, 4, 2, 1) and set USE_ACL False; every ++ YAML sets group sizes (4, 4, 14, 7), intervals
(4, 2, 1, 1) and USE_ACL True.  Common to all: head_dim 32, qkv bias, no APE, patch norm,
constant group type, padding bottom/right, masks on.

Dense (detection / segmentation) backbones, ``DENSE_CONFIGS``: the same networks without ``norm`` /
``head``, taking any H, W (multiples of 32) at run time and returning the four stages' maps taken
before each PatchMerging.  Two official codes exist, and they group the long-distance attention
differently (``block_layout``):

- ``code="v1"``: ``models/crossformer_backbone.py`` @ 4fbf750 (2022-06-05, branch ``crossformer``),
  the code the released dense weights were trained with (``detection/`` and ``segmentation/
  crossformer_factory.py`` there).  LDA pads to a multiple of the interval I only and forms I x I
  groups of (Hp/I) x (Wp/I) tokens, so a group's shape (and its DPB table) follows the input size.
- ``code="head"``: ``models/crossformer_backbone_det.py`` @ 7952010 (CrossFormer++ detection).
  LDA pads to a multiple of G*I and forms fixed G x G groups inside regions of G*I, like the
  classification code.

With the same weights the two compute the same block output exactly where (a) an LDA map fits one
HEAD region, max(H, W) <= G*I (HEAD's padded G x G groups then hold exactly v1's tokens, the rest
masked), and (b) a map forced to global SDA (min(H, W) <= G) is square (v1 uses G = min(H, W), HEAD
G = max(H, W)).  SDA blocks on larger maps are the same in both.  E.g. G 7, I (8, 4, 2, 1): all
stages alike at 224 x 224, none at 256 x 352 or 384 x 512; G (14, 14, 7, 7), I (16, 8, 2, 1):
stages 1-2 alike, 3-4 not, at both of those sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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
    # The stochastic-depth rate the official model is built with: config.py:59 (0.1, also CrossFormer's
    # own default, models/crossformer.py:641), overridden by each YAML's DROP_PATH_RATE (line 4).
    drop_path_rate: float = 0.1


# Training-time defaults of the official builders, for every variant: dropout ``drop_rate`` 0.0
# (config.py:57 MODEL.DROP_RATE, passed by models/build.py:21; the dense factories pass 0.0) and
# attention dropout ``attn_drop_rate`` 0.0 (never passed: CrossFormer's default, models/crossformer.py:641).
DEFAULT_DROP_RATE = 0.0
DEFAULT_ATTN_DROP_RATE = 0.0

_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), use_acl=True)
CONFIGS = {
    "crossformer_tiny": CrossFormerConfig(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16),
                                          drop_path_rate=0.1),
    "crossformer_small": CrossFormerConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                                           drop_path_rate=0.2),
    "crossformer_base": CrossFormerConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                                          drop_path_rate=0.3),
    "crossformer_large": CrossFormerConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                           drop_path_rate=0.5),
    "crossformer_pp_small": CrossFormerConfig(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16),
                                              drop_path_rate=0.2, **_PP),
    "crossformer_pp_base": CrossFormerConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                                             drop_path_rate=0.3, **_PP),
    "crossformer_pp_large": CrossFormerConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                              drop_path_rate=0.5, **_PP),
    "crossformer_pp_huge": CrossFormerConfig(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32),
                                             drop_path_rate=0.5, **_PP),
}


def drop_path_rates(drop_path_rate: float, depths) -> list:
    """The official per-block stochastic-depth rates, one list per stage: ``[x.item() for x in
    torch.linspace(0, drop_path_rate, sum(depths))]`` split by stage (models/crossformer.py:672, 694;
    the dense codes alike), every block of every stage, both residual branches.

    Computed without torch, to the bit: torch's CPU kernel works in float32 with
    step = rate / (n - 1), value i = start + step * i for the first half and end - step * (n - 1 - i)
    for the second, each a fused multiply-add (rounded once) -- checked equal to torch 2.13's
    ``linspace`` for every length below 200 at 208 rates (tests/test_train_crossformer.py checks
    lengths below 40).  A float32 ``numpy.linspace`` rounds from float64 instead and misses some of
    these values by one float32 ulp."""
    total = sum(depths)
    end = np.float32(drop_path_rate)
    if total == 1:
        rates = [0.0]
    else:
        step = np.float64(np.float32(end / np.float32(total - 1)))
        half = total // 2
        # products of a float32 and an index are exact in float64: one rounding, as the FMA
        rates = [float(np.float32(step * i if i < half else np.float64(end) - step * (total - 1 - i)))
                 for i in range(total)]
    out, start = [], 0
    for depth in depths:
        out.append(rates[start:start + depth])
        start += depth
    return out


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
    """How one block groups its (H, W) map, as the official code derives it from the resolution.

    Token ``r*Gh*I + g*I + i`` of a column (rows alike) goes to region ``r``, interval slot ``i``,
    place ``g`` of its group: I = 1 gives SDA's adjacent Gh x Gw windows, I > 1 LDA's dilated grids."""

    group_h: int  # rows of a group (Gh)
    group_w: int  # columns of a group (Gw); equal to group_h except in v1 LDA
    lsda_flag: int  # 0: SDA (adjacent G x G windows), 1: LDA (grids sampled every I tokens)
    group_interval: int  # stride between the tokens of a group: the LDA interval, or 1 for SDA
    pad_h: int  # zero rows added at the bottom so that Gh * stride divides the map
    pad_w: int  # zero columns added at the right

    @property
    def group_size(self):
        """G for square groups, (Gh, Gw) otherwise."""
        return self.group_h if self.group_h == self.group_w else (self.group_h, self.group_w)

    @property
    def group_shape(self) -> Tuple[int, int]:
        return self.group_h, self.group_w


CODES = (None, "v1", "head")  # the classification code, the v1 dense backbone, the HEAD dense backbone


def block_layout(resolution: tuple, group_size: int, interval: int, lsda_flag: int,
                 code: Optional[str] = None) -> BlockLayout:
    """The layout a block with these settings uses on a ``resolution`` map.

    ``code``: None for the classification model (``models/crossformer.py`` @ 7952010, lines 221-224,
    321-337), ``"v1"`` for the release-era dense backbone (``models/crossformer_backbone.py`` @ 4fbf750,
    lines 227-276), ``"head"`` for the CrossFormer++ dense backbone (``models/crossformer_backbone_det.py``
    @ 7952010, lines 259-318).  The official blocks *assign* the forced SDA (and v1 the shrunken
    group size) to themselves in ``forward``, so one small input would change every later input's
    layout; here the layout is a function of the configured values and this resolution only."""
    if code not in CODES:
        raise ValueError(f"unknown CrossFormer code {code!r}; expected one of {CODES}")
    H, W = resolution
    if min(H, W) <= group_size:  # one group covers the whole map (one side at least): SDA
        # v1 / classification: G = min(H, W); HEAD dense: G = max(H, W) (one padded group)
        group_size, lsda_flag = (max(H, W) if code == "head" else min(H, W)), 0
    if lsda_flag and code == "v1":  # I x I dilated groups of (Hp/I) x (Wp/I): pad to a multiple of I
        pad_h, pad_w = ((interval - side % interval) % interval for side in resolution)
        return BlockLayout((H + pad_h) // interval, (W + pad_w) // interval, 1, interval, pad_h, pad_w)
    stride = interval if lsda_flag else 1
    size_div = group_size * stride
    pad_h, pad_w = ((size_div - side % size_div) % size_div for side in resolution)
    return BlockLayout(group_size, group_size, lsda_flag, stride, pad_h, pad_w)


def scale_dims(total: int, n: int) -> tuple:
    """Output channels of the ``n`` cross-scale convs sharing ``total`` channels: total/2, total/4,
    ..., and the last (largest kernel) the same as the one before it, e.g. 64 -> (32, 16, 8, 8)."""
    return tuple(total // 2 ** (i if i == n - 1 else i + 1) for i in range(n))


# DPB index tables and padding masks: numpy, built once per block and registered by both models.

def coordinate_table(group_h: int, group_w: Optional[int] = None) -> np.ndarray:
    """All relative offsets (dh, dw) in [1-Gh, Gh-1] x [1-Gw, Gw-1], dh-major:
    ((2Gh-1)(2Gw-1), 2) float32.  ``group_w`` defaults to ``group_h`` (square groups)."""
    group_w = group_h if group_w is None else group_w
    rh, rw = np.arange(1 - group_h, group_h), np.arange(1 - group_w, group_w)
    return np.stack(np.meshgrid(rh, rw, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float32)


def relative_position_index(group_h: int, group_w: Optional[int] = None) -> np.ndarray:
    """Row of ``coordinate_table`` holding the offset from token j to token i of a Gh x Gw group:
    (Gh*Gw, Gh*Gw) int64, (dh + Gh - 1) * (2Gw - 1) + (dw + Gw - 1)."""
    group_w = group_h if group_w is None else group_w
    coords = np.stack(np.meshgrid(np.arange(group_h), np.arange(group_w), indexing="ij"), axis=-1).reshape(-1, 2)
    rel = coords[:, None, :] - coords[None, :, :]
    return ((rel[..., 0] + group_h - 1) * (2 * group_w - 1) + rel[..., 1] + group_w - 1).astype(np.int64)


def padding_key_mask(resolution: tuple, layout: BlockLayout) -> Optional[np.ndarray]:
    """(nG, 1, Gh*Gw) float32 additive mask, NEG_INF on the key columns that are padding and 0
    elsewhere (the same for every query row); None without padding.  Groups are ordered as the
    models' ``group_tokens`` orders them."""
    if not (layout.pad_h or layout.pad_w):
        return None
    (H, W), (Gh, Gw), I = resolution, layout.group_shape, layout.group_interval
    Hp, Wp = H + layout.pad_h, W + layout.pad_w
    padded = (np.arange(Hp)[:, None] >= H) | (np.arange(Wp)[None, :] >= W)
    # group_tokens without batch and channel axes: (rows, g, i) x (cols, g, i) -> (rows, cols, i, i, g, g)
    keys = padded.reshape(Hp // (Gh * I), Gh, I, Wp // (Gw * I), Gw, I).transpose(0, 3, 2, 5, 1, 4)
    return np.where(keys.reshape(-1, 1, Gh * Gw), np.float32(NEG_INF), np.float32(0.0))


def padding_mask(resolution: tuple, layout: BlockLayout) -> Optional[np.ndarray]:
    """``padding_key_mask`` repeated over the query rows: (nG, Gh*Gw, Gh*Gw) float32, or None."""
    keys = padding_key_mask(resolution, layout)
    if keys is None:
        return None
    return np.ascontiguousarray(np.broadcast_to(keys, (keys.shape[0], keys.shape[2], keys.shape[2])))


# ----------------------------------------------------------------------------- dense backbones

@dataclass(frozen=True)
class CrossFormerDenseConfig(CrossFormerConfig):
    """A dense backbone: the classification network's stages (no ``norm`` / ``head``), run at any
    H, W that are multiples of 32, grouping its LDA as ``code`` ("v1" or "head") does."""

    code: str = "v1"

    def input_problem(self, height: int, width: int) -> Optional[str]:
        """None when the official dense code takes ``height`` x ``width`` images, else why not."""
        if min(height, width) < SIZE_MULTIPLE or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            return (f"input {height}x{width}: H and W must be positive multiples of {SIZE_MULTIPLE} "
                    f"(patch stride 4, then three stride-2 merges that assert even feature maps)")
        return None


# Official: detection/ and segmentation/crossformer_factory.py (CrossFormer_S / _B / _L @ 4fbf750,
# CrossFormer_S2 @ 7952010) with the group sizes / intervals of the released configs
# (detection/configs/retinanet_crossformer_{s,b}_fpn_1x_coco.py, segmentation/configs/
# fpn_crossformer_l_ade20k_40k.py @ 4fbf750; detection/configs/crossformer_pp/
# retinanet_crossformerpp_s_fpn_1x_coco.py @ 7952010, adaptive_interval False).  Training: the factories
# fix drop_path_rate (S 0.2, B 0.3, L 0.5: detection/crossformer_factory.py:31, 54 @ 4fbf750,
# segmentation/crossformer_factory.py:77 @ 4fbf750; S2 0.2: detection/crossformer_factory.py:56 @ 7952010)
# and drop_rate 0.0, and leave attn_drop_rate at its default 0.
DENSE_CONFIGS = {
    "crossformer_small_det": CrossFormerDenseConfig(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), group_size=(7, 7, 7, 7),
        interval=(8, 4, 2, 1), drop_path_rate=0.2, code="v1"),
    "crossformer_base_det": CrossFormerDenseConfig(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), group_size=(7, 7, 7, 7),
        interval=(8, 4, 2, 1), drop_path_rate=0.3, code="v1"),
    "crossformer_large_seg": CrossFormerDenseConfig(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), group_size=(14, 14, 7, 7),
        interval=(16, 8, 2, 1), drop_path_rate=0.5, code="v1"),
    "crossformer_pp_small_det": CrossFormerDenseConfig(
        embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), group_size=(7, 7, 7, 7),
        interval=(8, 4, 2, 1), use_acl=True, drop_path_rate=0.2, code="head"),
}
