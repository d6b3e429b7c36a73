"""CrossFormer and CrossFormer++, PaddlePaddle port.

Mirrors ``reference_torch/crossformer.py`` class for class and attribute for attribute, so
parameter names equal the official PyTorch keys; nn.Linear weights are stored (in, out).
See the reference for the architecture notes (cross-scale embedding, SDA/LDA, dynamic position
bias, CrossFormer++'s per-stage group sizes and activation cooling layer).

The classification models are built for one input size (``img_size``, a multiple of 32): group
layout, padding and masks follow the resolution exactly as the official code derives them.  The
dense backbone (``CrossFormerBackbone``) reuses the same blocks built without a resolution and
derives every block's layout, DPB tables and padding mask from each input's H, W (see the
reference for the v1 / HEAD grouping and the official code's in-place layout changes, which are
not reproduced: the layout depends on the current input only).

Trains as the official model does (see the reference's docstring): ``drop_path_rate`` (stochastic
depth on both residual branches of every block at the official linspace rate, none at rate 0),
``drop_rate`` (``pos_drop``, the MLP's dropout, ``proj_drop``), ``attn_drop_rate``, with the official
defaults.  Built without weights, it is initialised as the official ``_init_weights``: Linear
trunc_normal(std .02, absolute bounds +-2 as torch's ``trunc_normal_``) with zero bias, LayerNorm 1 / 0,
and the convs as torch initialises an ``nn.Conv2d`` (the official code leaves them at that default):
weight and bias uniform(+-1 / sqrt(fan_in)) -- Paddle's own defaults would differ.
"""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn

from model_configs.crossformer import (CONFIGS, DEFAULT_ATTN_DROP_RATE, DEFAULT_DROP_RATE, DENSE_CONFIGS,
                                       CrossFormerConfig, CrossFormerDenseConfig, block_layout, check_img_size,
                                       coordinate_table, padding_key_mask, padding_mask, relative_position_index,
                                       scale_dims, drop_path_rates)

from . import layers
from .layers import DropPath, Linear, add_into, permute, reshape, softmax
from .onednn import TableLayerNorm, pad_nhwc, transpose_reshape
from .patch_conv import PatchConv2D

__all__ = ["CrossFormer", "CrossFormerBackbone", "CrossFormerConfig", "CrossFormerDenseConfig", "CONFIGS",
           "DENSE_CONFIGS", "DENSE_MODEL"]


def group_tokens(x, group_h, group_w, interval):
    """(B, Hp, Wp, C) -> (B * nG, Gh*Gw, C). Token (r*G*I + g*I + i) along each axis goes to group
    (r, i), slot g: interval 1 gives SDA's adjacent windows, interval I gives LDA's dilated grids."""
    _, _, Wp, C = x.shape
    Gh, Gw, I = group_h, group_w, interval
    cols = Wp // (Gw * I)
    # (B, rows, Gh, I, cols, Gw, I, C) -> (B, rows, cols, I, I, Gh, Gw, C) as two transposes of at most
    # 6 axes (oneDNN's takes no more; see paddle_models/onednn.py): first the column axes, to
    # (B*Hp, cols, I, Gw, C), then the row axes, the column slot riding along with the channels,
    # (B*rows, Gh, I, cols, I, Gw*C) to (B*rows, cols, I, I, Gh, Gw*C).
    x = transpose_reshape(x.reshape([-1, cols, Gw, I, C]), [0, 1, 3, 2, 4], [-1, Gh, I, cols, I, Gw * C])
    return transpose_reshape(x, [0, 3, 2, 4, 1, 5], [-1, Gh * Gw, C])


def ungroup_tokens(x, batch, height, width, group_h, group_w, interval):
    """Inverse of ``group_tokens``: (B * nG, Gh*Gw, C) -> (B, Hp, Wp, C)."""
    Gh, Gw, I = group_h, group_w, interval
    C, cols = x.shape[-1], width // (Gw * I)
    # group_tokens' two steps undone in reverse order
    x = transpose_reshape(x.reshape([-1, cols, I, I, Gh, Gw * C]), [0, 4, 2, 1, 3, 5], [-1, cols, I, Gw, C])
    return transpose_reshape(x, [0, 1, 3, 2, 4], [batch, height, width, C])


def _init_weights(m):
    """The official ``CrossFormer._init_weights`` (models/crossformer.py:760-767), plus the torch
    default the official convs keep (``nn.Conv2d.reset_parameters``: kaiming_uniform(a=sqrt(5)) for
    the weight and uniform for the bias, both bound 1 / sqrt(fan_in), fan_in = in/groups * kh * kw)."""
    if isinstance(m, nn.Linear):
        nn.initializer.TruncatedNormal(mean=0.0, std=.02, a=-2.0, b=2.0)(m.weight)
        if m.bias is not None:
            nn.initializer.Constant(0.0)(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.initializer.Constant(0.0)(m.bias)
        nn.initializer.Constant(1.0)(m.weight)
    elif isinstance(m, nn.Conv2D):
        bound = 1.0 / math.sqrt(math.prod(m.weight.shape[1:]))
        nn.initializer.Uniform(-bound, bound)(m.weight)
        if m.bias is not None:
            nn.initializer.Uniform(-bound, bound)(m.bias)


class Mlp(nn.Layer):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (one Dropout module, applied twice)."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = layers.GELU(in_place=True)  # on fc1's fresh output
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _dpb_layer(in_dim, out_dim):
    return nn.Sequential(TableLayerNorm(in_dim), nn.ReLU(), Linear(in_dim, out_dim))


class DynamicPosBias(nn.Layer):
    """Offsets (dh, dw) -> per-head bias: Linear(2, d), then three LN -> ReLU -> Linear layers."""

    def __init__(self, pos_dim, num_heads):
        super().__init__()
        self.pos_proj = Linear(2, pos_dim)
        self.pos1 = _dpb_layer(pos_dim, pos_dim)
        self.pos2 = _dpb_layer(pos_dim, pos_dim)
        self.pos3 = _dpb_layer(pos_dim, num_heads)

    def forward(self, biases):
        return self.pos3(self.pos2(self.pos1(self.pos_proj(biases))))


class Attention(nn.Layer):
    """Multi-head self-attention inside each group, plus the dynamic position bias."""

    def __init__(self, dim, group_size, num_heads, attn_drop=0.0, proj_drop=0.0):
        """``group_size``: the G the DPB tables are built (and registered) for, or None (dense: the
        tables follow each call's group shape)."""
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.pos = DynamicPosBias(dim // 16, num_heads)  # official: DPB(dim // 4) with pos_dim = dim // 4
        if group_size is not None:
            self.register_buffer("biases", paddle.to_tensor(coordinate_table(group_size)), persistable=False)
            self.register_buffer("relative_position_index", paddle.to_tensor(relative_position_index(group_size)),
                                 persistable=False)
        self.qkv = Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, mask=None, group_shape=None):
        """``group_shape`` (Gh, Gw): build the DPB tables for it now (dense), else use the registered ones."""
        B_, N, C = x.shape
        q, k, v = layers.qkv_heads(self.qkv, x, self.num_heads)
        q = q * self.scale
        attn = paddle.matmul(q, k, transpose_y=True)
        if group_shape is None:
            biases, index = self.biases, self.relative_position_index
        else:  # official: built in forward, `.float()`; the parameters' dtype here
            biases = paddle.to_tensor(coordinate_table(*group_shape), dtype=self.pos.pos_proj.weight.dtype)
            index = paddle.to_tensor(relative_position_index(*group_shape))
        pos = self.pos(biases)  # ((2Gh-1)(2Gw-1), heads)
        # bias and mask as dense tensors broadcast over leading axes they do not name: Paddle 3.3's CPU
        # add reads a strided view, or an explicit leading 1, through its slow generic path (the bias
        # add on [512, 3, 49, 49]: 32 ms that way, 9 ms dense, less in place)
        attn = add_into(attn, permute(pos[index.flatten()].reshape([N, N, -1]), [2, 0, 1]))
        if mask is not None:
            nG = mask.shape[0]
            mask = mask.unsqueeze(1)  # [nG, 1, N, N]; a traced graph keeps oneDNN's broadcast of [1, nG, 1, N, N]
            mask = mask.expand([nG, self.num_heads, N, N]) if paddle.in_dynamic_mode() else mask.unsqueeze(0)
            attn = (reshape(attn, [B_ // nG, nG, self.num_heads, N, N]) + mask).reshape([-1, self.num_heads, N, N])
        attn = self.attn_drop(softmax(attn))
        x = permute(paddle.matmul(attn, v), [0, 2, 1, 3]).reshape([-1, N, C])
        return self.proj_drop(self.proj(x))


class CrossFormerBlock(nn.Layer):
    """Pre-norm block: SDA (lsda_flag 0) or LDA (1) attention, MLP, and optionally ACL.

    Built for ``input_resolution`` (classification: layout, tables and mask fixed at init), or with
    ``input_resolution=None`` (dense: ``forward(x, size)`` derives them from each call's (H, W), as the
    official dense ``code`` does; nothing about one call is kept for the next)."""

    def __init__(self, dim, input_resolution, num_heads, group_size, interval, lsda_flag, mlp_ratio,
                 use_extra_conv, code=None, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.input_resolution = input_resolution
        self.group_size, self.interval, self.lsda_flag, self.code = group_size, interval, lsda_flag, code
        # The resolution decides the effective group size, SDA vs LDA and the padding.
        self.layout = None if input_resolution is None else block_layout(input_resolution, group_size, interval,
                                                                          lsda_flag, code)
        self.use_extra_conv = use_extra_conv
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, None if self.layout is None else self.layout.group_size, num_heads,
                              attn_drop=attn_drop, proj_drop=drop)
        if use_extra_conv:
            self.ex_conv = layers.Conv2D(dim, dim, 3, padding=1, groups=dim)
            self.ex_ln = nn.LayerNorm(dim)
        # one layer on both residual branches, each call drawing its own mask; none at rate 0
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

        mask = None if input_resolution is None else padding_mask(input_resolution, self.layout)
        self.register_buffer("attn_mask", None if mask is None else paddle.to_tensor(mask), persistable=False)

    def forward(self, x, size=None):
        B, L, C = x.shape
        if size is None:  # built for one resolution
            (H, W), lay, mask, group_shape = self.input_resolution, self.layout, self.attn_mask, None
        else:  # dense: this call's layout; the mask only marks key columns, broadcast over the queries
            H, W = size
            lay = block_layout(size, self.group_size, self.interval, self.lsda_flag, self.code)
            mask = padding_key_mask(size, lay)
            mask = None if mask is None else paddle.to_tensor(mask, dtype=x.dtype)
            group_shape = lay.group_shape
        shortcut = x
        x = reshape(self.norm1(x), [B, H, W, C])
        if lay.pad_h or lay.pad_w:
            x = pad_nhwc(x, lay.pad_h, lay.pad_w)  # zeros after norm1, bottom/right
        x = group_tokens(x, lay.group_h, lay.group_w, lay.group_interval)
        x = self.attn(x, mask=mask, group_shape=group_shape)
        x = ungroup_tokens(x, B, H + lay.pad_h, W + lay.pad_w, lay.group_h, lay.group_w, lay.group_interval)
        x = reshape(x[:, :H, :W, :], [B, H * W, C])
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_extra_conv:  # ACL: no residual, its output replaces x
            x = self.ex_conv(reshape(x, [B, H, W, C]).transpose([0, 3, 1, 2]))
            x = self.ex_ln(transpose_reshape(x, [0, 2, 3, 1], [B, H * W, C]))
        return x


class PatchMerging(nn.Layer):
    """Cross-scale merge: LayerNorm, then stride-2 convs of several kernels, concatenated on channels."""

    def __init__(self, input_resolution, dim, patch_size):
        super().__init__()
        self.input_resolution = input_resolution
        self.reductions = nn.LayerList()  # registered before norm, as in the official key order
        self.norm = nn.LayerNorm(dim)
        for ps, out_dim in zip(patch_size, scale_dims(2 * dim, len(patch_size))):
            self.reductions.append(layers.Conv2D(dim, out_dim, ps, stride=2, padding=(ps - 2) // 2))

    def forward(self, x, size=None):
        H, W = self.input_resolution if size is None else size
        B, L, C = x.shape
        x = reshape(self.norm(x), [B, H, W, C]).transpose([0, 3, 1, 2])
        return paddle.concat([r(x).flatten(2).transpose([0, 2, 1]) for r in self.reductions], axis=2)


class Stage(nn.Layer):
    """Blocks alternating SDA/LDA; ACL after every third block but the last; then the merge.
    ``drop_path``: the stage's per-block stochastic-depth rates."""

    def __init__(self, dim, input_resolution, depth, num_heads, group_size, interval, mlp_ratio, use_acl,
                 merge_size=None, code=None, drop=0.0, attn_drop=0.0, drop_path=None):
        super().__init__()
        drop_path = [0.0] * depth if drop_path is None else drop_path
        self.blocks = nn.LayerList([
            CrossFormerBlock(dim, input_resolution, num_heads, group_size, interval, lsda_flag=i % 2,
                             mlp_ratio=mlp_ratio, use_extra_conv=use_acl and (i + 1) % 3 == 0 and i < depth - 1,
                             code=code, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i])
            for i in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim, merge_size) if merge_size else None

    def forward(self, x, size=None):
        """Built for one resolution (``size`` None): the merged tokens.  Dense (``size`` = (H, W)):
        (the blocks' output tokens, the merged tokens or None), as the official dense Stage returns
        (feat, x)."""
        for blk in self.blocks:
            x = blk(x, size)
        if size is None:
            return x if self.downsample is None else self.downsample(x)
        return x, (None if self.downsample is None else self.downsample(x, size))


class PatchEmbed(nn.Layer):
    """Cross-scale embedding: convs of several kernels at one stride, concatenated, then LayerNorm."""

    def __init__(self, img_size, patch_size, embed_dim):
        super().__init__()
        self.img_size = img_size  # None: any size (dense)
        self.projs = nn.LayerList()
        for ps, dim in zip(patch_size, scale_dims(embed_dim, len(patch_size))):
            self.projs.append(PatchConv2D(3, dim, ps, stride=patch_size[0], padding=(ps - patch_size[0]) // 2))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        B, C, H, W = x.shape
        if self.img_size is not None and (H != self.img_size or W != self.img_size):
            raise ValueError(f"input {H}x{W} does not match the size the model was built for "
                             f"({self.img_size}x{self.img_size}); rebuild it with img_size={H}")
        x = paddle.concat([proj(x).flatten(2).transpose([0, 2, 1]) for proj in self.projs], axis=2)
        return self.norm(x)


class CrossFormer(nn.Layer):
    """The classification model.  ``drop_path_rate`` None: the variant's official rate
    (``cfg.drop_path_rate``); the dropouts default to the official 0."""

    def __init__(self, cfg: CrossFormerConfig, img_size=224, num_classes=1000, drop_rate=DEFAULT_DROP_RATE,
                 attn_drop_rate=DEFAULT_ATTN_DROP_RATE, drop_path_rate=None):
        super().__init__()
        check_img_size(img_size)
        self.num_classes = num_classes
        num_stages = len(cfg.depths)
        self.num_features = cfg.embed_dim * 2 ** (num_stages - 1)
        self.patch_embed = PatchEmbed(img_size, cfg.patch_size, cfg.embed_dim)
        self.pos_drop = nn.Dropout(float(drop_rate))
        # torch.linspace's float32 values, to the bit (the shared numpy schedule misses some by an ulp)
        dpr = drop_path_rates(cfg.drop_path_rate if drop_path_rate is None else float(drop_path_rate), cfg.depths)
        res = img_size // cfg.patch_size[0]
        self.layers = nn.LayerList([
            Stage(cfg.embed_dim * 2 ** i, (res // 2 ** i, res // 2 ** i), cfg.depths[i], cfg.num_heads[i],
                  cfg.group_size[i], cfg.interval[i], cfg.mlp_ratio, cfg.use_acl,
                  merge_size=cfg.merge_size[i] if i < num_stages - 1 else None,
                  drop=float(drop_rate), attn_drop=float(attn_drop_rate), drop_path=dpr[i])
            for i in range(num_stages)])
        self.stage_names = tuple(f"layers.{i}" for i in range(num_stages))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(axis=1)  # official: AdaptiveAvgPool1d over the tokens

    def forward(self, x):
        return self.head(self.forward_features(x))


class CrossFormerBackbone(nn.Layer):
    """Dense backbone (official ``CrossFormer_S`` / ``_B`` / ``_L`` / ``_S2`` of the detection and
    segmentation factories): patch embedding and the four stages, no ``norm`` / ``avgpool`` / ``head``.
    ``forward`` takes NCHW images of any H, W that are multiples of 32 and returns the NCHW maps of
    ``out_indices`` (stage i: stride 4 * 2^i), each taken before that stage's PatchMerging.
    Training arguments and init as ``CrossFormer``."""

    def __init__(self, cfg: CrossFormerDenseConfig, out_indices=(0, 1, 2, 3), drop_rate=DEFAULT_DROP_RATE,
                 attn_drop_rate=DEFAULT_ATTN_DROP_RATE, drop_path_rate=None):
        super().__init__()
        num_stages = len(cfg.depths)
        self.out_indices = tuple(out_indices)
        if not self.out_indices or len(set(self.out_indices)) != len(self.out_indices) or \
                not all(0 <= i < num_stages for i in self.out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in 0..{num_stages - 1}, got {out_indices!r}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(None, cfg.patch_size, cfg.embed_dim)
        self.pos_drop = nn.Dropout(float(drop_rate))
        dpr = drop_path_rates(cfg.drop_path_rate if drop_path_rate is None else float(drop_path_rate), cfg.depths)
        self.layers = nn.LayerList([
            Stage(cfg.embed_dim * 2 ** i, None, cfg.depths[i], cfg.num_heads[i], cfg.group_size[i], cfg.interval[i],
                  cfg.mlp_ratio, cfg.use_acl, merge_size=cfg.merge_size[i] if i < num_stages - 1 else None,
                  code=cfg.code, drop=float(drop_rate), attn_drop=float(attn_drop_rate), drop_path=dpr[i])
            for i in range(num_stages)])
        self.stage_names = tuple(f"layers.{i}" for i in range(num_stages))
        self.feature_info = [{"channels": cfg.embed_dim * 2 ** i, "stride": cfg.patch_size[0] * 2 ** i}
                             for i in self.out_indices]
        self.apply(_init_weights)

    def forward(self, x):
        B, _, H, W = x.shape
        problem = self.cfg.input_problem(H, W)
        if problem:
            raise ValueError(f"CrossFormer dense backbone: {problem}")
        x = self.pos_drop(self.patch_embed(x))
        H, W = H // self.cfg.patch_size[0], W // self.cfg.patch_size[0]
        feats = {}
        for i, layer in enumerate(self.layers[:max(self.out_indices) + 1]):
            feat, x = layer(x, (H, W))
            if i in self.out_indices:
                feats[i] = feat.reshape([B, H, W, -1]).transpose([0, 3, 1, 2])
            H, W = H // 2, W // 2
        return [feats[i] for i in self.out_indices]


DENSE_MODEL = CrossFormerBackbone


def _create(name, pretrained=False, num_classes=1000, img_size=224, **kwargs):
    if pretrained:
        raise ValueError("torch2paddle builds models without downloading weights; load converted weights instead")
    return CrossFormer(CONFIGS[name], img_size=img_size, num_classes=num_classes, **kwargs)  # unknown: TypeError


# One factory per variant, named as the registry names them; they take num_classes, img_size and the
# training arguments (drop_rate, attn_drop_rate, drop_path_rate).
def crossformer_tiny(pretrained=False, **kwargs): return _create("crossformer_tiny", pretrained, **kwargs)  # noqa: E704
def crossformer_small(pretrained=False, **kwargs): return _create("crossformer_small", pretrained, **kwargs)  # noqa: E704
def crossformer_base(pretrained=False, **kwargs): return _create("crossformer_base", pretrained, **kwargs)  # noqa: E704
def crossformer_large(pretrained=False, **kwargs): return _create("crossformer_large", pretrained, **kwargs)  # noqa: E704
def crossformer_pp_small(pretrained=False, **kwargs): return _create("crossformer_pp_small", pretrained, **kwargs)  # noqa: E704
def crossformer_pp_base(pretrained=False, **kwargs): return _create("crossformer_pp_base", pretrained, **kwargs)  # noqa: E704
def crossformer_pp_large(pretrained=False, **kwargs): return _create("crossformer_pp_large", pretrained, **kwargs)  # noqa: E704
def crossformer_pp_huge(pretrained=False, **kwargs): return _create("crossformer_pp_huge", pretrained, **kwargs)  # noqa: E704


def _create_dense(name, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError("torch2paddle builds models without downloading weights; load converted weights instead")
    return DENSE_MODEL(DENSE_CONFIGS[name], **kwargs)  # an unknown keyword: TypeError


# Dense backbones: one factory per dense name; they take out_indices and the training arguments.
def crossformer_small_det(pretrained=False, **kwargs):
    return _create_dense("crossformer_small_det", pretrained, **kwargs)


def crossformer_base_det(pretrained=False, **kwargs):
    return _create_dense("crossformer_base_det", pretrained, **kwargs)


def crossformer_large_seg(pretrained=False, **kwargs):
    return _create_dense("crossformer_large_seg", pretrained, **kwargs)


def crossformer_pp_small_det(pretrained=False, **kwargs):
    return _create_dense("crossformer_pp_small_det", pretrained, **kwargs)
