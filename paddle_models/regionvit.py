"""RegionViT: regional-to-local attention vision transformer (Paddle).

Paddle port of ``reference_torch/regionvit.py`` (official code IBM/RegionViT @
77000c2): same classes, attribute names and order, so parameter names equal the
official state-dict keys.  Linear weights are stored (in, out); everything else,
including the 2-D ``rel_pos`` and the (1, C, 1, 1) LayerNorm2d parameters, keeps
the torch layout.  See the torch file for the numerics the port keeps (shared
``attn``, wrap-around relative position index, the official padding mask with
its bottom-right-window quirk, ``proj_cls`` aliasing ``proj``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from model_configs.regionvit import (CONFIGS, DENSE_CONFIGS, RegionViTDenseConfig, regional_padding, rel_pos_index,
                                     window_mask)

from . import layers, native
from .layers import DropPath, Linear, add_into, dense_operand, drop_path_schedule, permute, reshape, softmax
from .onednn import transpose_reshape

__all__ = ["RegionViT", "RegionViTDet", "DENSE_MODEL"]

# The official init (see the torch reference's RegionViT docstring), given at creation so that each
# weight is sampled once (Paddle's CPU sampling costs ~20 ns a value; regionvit_base_w14 has 73.8M).
# Linear weights and ``rel_pos``: the official trunc_normal_(std .02) cuts at the absolute +-2, i.e.
# +-100 std, so it IS a normal(0, .02).  Paddle's TruncatedNormal(std=.02, a=-2, b=2) is not: its
# tails are coarse and about 2e-8 of its values come out clamped to exactly +-2 (measured: 4 in 2e8
# draws; torch's trunc_normal_ 0 in 2e8), i.e. a 100-std weight somewhere in one init of the larger
# variants.  Normal has neither defect.  Biases zero.
_WEIGHT_INIT = nn.initializer.Normal(mean=0.0, std=0.02)
_ZERO = nn.initializer.Constant(0.0)


def linear(in_features: int, out_features: int) -> nn.Linear:
    return Linear(in_features, out_features, weight_attr=_WEIGHT_INIT, bias_attr=_ZERO)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
           groups: int = 1, bias: bool = True) -> nn.Conv2D:
    """``layers.Conv2D`` (``nn.Conv2D``, its bias added faster) with torch's default init, which the official code keeps for every conv:
    kaiming_uniform_(a=sqrt(5)) is uniform(+-1/sqrt(fan_in)), and so is the bias
    (fan_in = in_channels / groups * k * k).  Paddle's own default is a normal and zero bias."""
    bound = 1.0 / math.sqrt(in_channels // groups * kernel_size * kernel_size)
    uniform = nn.initializer.Uniform(-bound, bound)
    return layers.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                     weight_attr=uniform, bias_attr=uniform if bias else False)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------

class LayerNorm2d(nn.Layer):
    """LayerNorm over the channels of an NCHW tensor; affine params shaped (1, C, 1, 1).  Where nothing
    is recorded, on CPU, by the compiled kernel (``native.native_channel_layer_norm``: the same steps,
    its mean and variance rounded once from double sums where Paddle's float32 means sum naively)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([1, channels, 1, 1], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([1, channels, 1, 1], default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x):
        if native.runs_natively(x, self.weight, self.bias):  # the same steps, one compiled pass
            return native.native_channel_layer_norm(x, self.weight, self.bias, self.eps)
        centred = x - dense_operand(x.mean(1, keepdim=True), x)
        # biased variance; centred * centred, not .square(): under oneDNN, Paddle Inference's inplace
        # pass makes square overwrite its input, centred, which the line below still reads
        # (paddle_models/onednn.py)
        std = paddle.sqrt((centred * centred).mean(1, keepdim=True) + self.eps)
        # the affine as [C, 1, 1] operands (the same products): Paddle broadcasts a [1, C, 1, 1] one by
        # its slow path (layers.Conv2D).  In dygraph the divide keeps its [B, 1, H, W] divisor, though
        # that broadcast is slow too (111 vs 57 ms on [8, 96, 56, 56]): Paddle's same-shape divide is
        # not correctly rounded (one ulp off on ~0.3% of quotients), the broadcast one is, as torch's.
        # A traced graph expands it: Paddle Inference runs the broadcast divide outside oneDNN, 3x
        # slower (this LayerNorm on [1, 96, 56, 56]: 4.6 vs 1.4 ms).  regionvit_small's export, oneDNN
        # on: -5% at batch 1, -11% at batch 8; off: -7% at batch 1.
        return centred / _divisor(std, centred) * self.weight.reshape([-1, 1, 1]) + self.bias.reshape([-1, 1, 1])


def _divisor(std, like):
    """``std`` [B, 1, H, W] as LayerNorm2d divides by it: as is in dygraph, expanded to ``like`` in a
    traced graph (see LayerNorm2d.forward)."""
    if paddle.in_dynamic_mode():
        return std
    return std.expand_as(like)


class Mlp(nn.Layer):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = linear(dim, hidden_dim)
        self.act = layers.GELU(in_place=True)  # on fc1's fresh output
        self.fc2 = linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)  # mode upscale_in_train: torch's

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Layer):
    """Image -> tokens.  '3conv' / '1conv' make the local tokens (stride 4), 'linear' the regional ones."""

    def __init__(self, patch_size: int, embed_dim: int, conv_type: str, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        if conv_type == "3conv":
            self.proj = nn.Sequential(
                conv2d(in_chans, embed_dim // 4, 3, stride=2, padding=1),
                LayerNorm2d(embed_dim // 4),
                layers.GELU(in_place=True),
                conv2d(embed_dim // 4, embed_dim // 2, 3, stride=2, padding=1),
                LayerNorm2d(embed_dim // 2),
                layers.GELU(in_place=True),
                conv2d(embed_dim // 2, embed_dim, 3, stride=1, padding=1),
            )
        elif conv_type == "1conv":
            self.proj = conv2d(in_chans, embed_dim, 2 * patch_size, stride=patch_size, padding=patch_size - 1)
        elif conv_type == "linear":
            self.proj = conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        else:
            raise ValueError(f"unknown patch conv type {conv_type!r}")

    def forward(self, x, extra_padding: bool = False):
        if extra_padding:
            padding = regional_padding(x.shape[2], x.shape[3], self.patch_size)  # official quirk included
            if any(padding):
                x = F.pad(x, list(padding))
        return self.proj(x)


class AttentionWithRelPos(nn.Layer):
    """Multi-head attention; with ``patch_attn`` adds the relative position bias among local tokens."""

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.window_size = window_size
        self.qkv = linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos = self.create_parameter([num_heads, (2 * window_size - 1) ** 2],
                                             default_initializer=_WEIGHT_INIT)
        self.register_buffer("rel_pos_index", paddle.to_tensor(rel_pos_index(window_size)), persistable=False)

    def forward(self, x, patch_attn: bool = False, mask=None):
        B, N, C = x.shape
        q, k, v = layers.qkv_heads(self.qkv, x, self.num_heads)
        attn = paddle.matmul(q, k, transpose_y=True) * self.scale  # k read transposed in place
        if patch_attn:
            n = self.window_size ** 2
            bias = paddle.index_select(self.rel_pos, self.rel_pos_index, axis=1).reshape([self.num_heads, n, n])
            # nothing added for the regional token; padded as 4-D (pad3d): oneDNN's all-axes pad of a
            # 3-D tensor corrupts memory (paddle_models/onednn.py)
            # [heads, N, N], dense: Paddle's add broadcasts an explicit leading 1 by its slow path; a
            # traced graph expands it over the windows too: with oneDNN for its fused ops only the add is
            # Paddle's, whose leading broadcast is slow (regionvit_small fused-only batch 1 / 8:
            # 170.9 / 1124 -> 163.3 / 1058 ms; oneDNN on at batch 8 1093 -> 1137; bit for bit)
            bias = F.pad(bias.unsqueeze(0), [N - n, 0, N - n, 0]).squeeze(0)
            attn = add_into(attn, bias if paddle.in_dynamic_mode() else bias.expand_as(attn))
        if mask is not None:
            attn = paddle.masked_fill(attn, mask, paddle.finfo(attn.dtype).min)
        attn = self.attn_drop(softmax(attn))
        x = permute(attn @ v, [0, 2, 1, 3]).reshape([-1, N, C])
        return self.proj_drop(self.proj(x))


def _with_regional_tokens(x, regional):
    """``x`` (B * windows, 1 + ws^2, C) with its token 0 replaced by ``regional`` (B * windows, 1, C).
    A traced graph writes the regional tokens into ``x`` (``setitem``: Paddle Inference runs it in
    place, ``x`` being read no more) where the concat copied the local tokens twice, once for the
    slice, once for the concat: regionvit_small's export, interleaved A/B, fused ops only batch 1 /
    8 174.4 / 1085 -> 168.9 / 1060 ms, oneDNN on batch 1 187.8 -> 180.6, off 192.9 -> 195.9 (noise);
    bit for bit."""
    if paddle.in_dynamic_mode():
        return paddle.concat([regional, x[:, 1:]], axis=1)
    return paddle.static.setitem(x, (slice(None), slice(0, 1)), regional)


class R2LAttentionPlusFFN(nn.Layer):
    """Regional self-attention, then regional-to-local attention per window, then an MLP.  One
    drop-path layer (only where the block's rate is > 0, as official) on all three residual branches."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, norm_layer,
                 drop_path: float = 0.0, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.norm0 = norm_layer(dim)
        self.norm1 = norm_layer(dim)
        self.attn = AttentionWithRelPos(dim, num_heads, window_size, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, windows: int, mask=None):
        C = x.shape[-1]
        # (B, windows, C); the batch as -1 and the window count a constant: a traced graph then builds
        # no reshape targets per forward (the attention's too, whose token count this is)
        regional = x[:, 0:1].reshape([-1, windows, C])
        regional = regional + self.drop_path(self.attn(self.norm0(regional)))
        x = _with_regional_tokens(x, regional.reshape([-1, 1, C]))
        x = x + self.drop_path(self.attn(self.norm1(x), patch_attn=True, mask=mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Projection(nn.Layer):
    """Stage entry, shared by both token sets: identity, or LayerNorm2d-GELU-depthwise x2 conv with stride 2."""

    def __init__(self, in_dim: int, out_dim: int, mode: str):
        super().__init__()
        if mode == "c" and in_dim == out_dim:
            self.proj = nn.Sequential(nn.Identity())
        elif mode == "sc":
            self.proj = nn.Sequential(
                LayerNorm2d(in_dim),
                layers.GELU(in_place=True),
                conv2d(in_dim, out_dim, 3, stride=2, padding=1, groups=in_dim),
            )
        else:
            raise ValueError(f"unsupported downsampling {mode!r} for {in_dim} -> {out_dim} channels")
        self.proj_cls = self.proj  # one layer under two names, as in the official model

    def forward(self, regional, local):
        return self.proj_cls(regional), self.proj(local)


def to_flat_layout(regional, local, ws: int):
    """(B, C, Hr, Wr) and (B, C, H, W) -> (B * Hr * Wr, 1 + ws^2, C) and the attention mask (or None)."""
    B, C, H, W = local.shape
    rows, cols = regional.shape[2:]
    pad_b, pad_r = rows * ws - H, cols * ws - W
    mask = None
    if pad_b or pad_r:
        local = F.pad(local, [0, pad_r, 0, pad_b])
        blocked = paddle.to_tensor(window_mask(rows, cols, ws, pad_b, pad_r).copy())
        mask = paddle.tile(blocked, [B, 1, 1]).unsqueeze(1)  # (B * windows, 1, N, N), broadcast over heads
    # transpose_reshape: a transpose+reshape pair feeding concat breaks under oneDNN (paddle_models/onednn.py)
    local = transpose_reshape(reshape(local, [B, C, rows, ws, cols, ws]), [0, 2, 4, 3, 5, 1], [-1, ws * ws, C])
    regional = transpose_reshape(regional.flatten(2), [0, 2, 1], [-1, 1, C])
    return paddle.concat([regional, local], axis=1), mask


def to_spatial_layout(x, batch: int, rows: int, cols: int, size: tuple, ws: int):
    """Inverse of ``to_flat_layout``; crops the padding back to ``size`` = (H, W)."""
    C = x.shape[-1]
    regional = reshape(x[:, 0], [batch, rows, cols, C]).transpose([0, 3, 1, 2])
    local = transpose_reshape(reshape(x[:, 1:], [batch, rows, cols, ws, ws, C]), [0, 5, 1, 3, 2, 4],
                              [batch, C, rows * ws, cols * ws])
    # contiguous like the official F.fold output: the next LayerNorm2d's reductions depend on the layout
    local = local.contiguous()[:, :, :size[0], :size[1]]
    return regional, local


class ConvAttBlock(nn.Layer):
    """One stage: ``block.0`` is the Projection, ``block.1..depth`` the R2L blocks; optional PEG after the first."""

    def __init__(self, in_dim: int, out_dim: int, window_size: int, depth: int, num_heads: int, mlp_ratio: float,
                 downsampling: str, norm_layer, drop_path: tuple, attn_drop: float = 0.0, drop: float = 0.0,
                 peg: bool = False):
        super().__init__()
        self.window_size = window_size
        self.block = nn.LayerList(
            [Projection(in_dim, out_dim, downsampling)]
            + [R2LAttentionPlusFFN(out_dim, num_heads, window_size, mlp_ratio, norm_layer,
                                   drop_path=drop_path[i], attn_drop=attn_drop, drop=drop) for i in range(depth)])
        self.peg = conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim, bias=False) if peg else None

    def forward(self, regional, local):
        ws = self.window_size
        regional, local = self.block[0](regional, local)
        B, _, rows, cols = regional.shape
        size = tuple(local.shape[2:])
        x, mask = to_flat_layout(regional, local, ws)
        for i in range(1, len(self.block)):
            x = self.block[i](x, rows * cols, mask)
            if self.peg is not None and i == 1:
                regional, local = to_spatial_layout(x, B, rows, cols, size, ws)
                x, mask = to_flat_layout(regional + self.peg(regional), local + self.peg(local), ws)
        return to_spatial_layout(x, B, rows, cols, size, ws)


class RegionViT(nn.Layer):
    """RegionViT.  ``layers[i]`` returns (regional, local) tokens; the head pools the last regional tokens.
    Training arguments, their official defaults and the init: as the torch reference's docstring."""

    def __init__(self, embed_dim=(96, 96, 192, 384, 768), depth=(2, 2, 8, 2), num_heads=(3, 6, 12, 24),
                 window_size: int = 7, patch_conv_type: str = "3conv", peg: bool = False, num_classes: int = 1000,
                 patch_size: int = 4, in_chans: int = 3, mlp_ratio: float = 4.0,
                 downsampling=("c", "sc", "sc", "sc"), drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        norm_layer = functools.partial(nn.LayerNorm, epsilon=1e-6)
        self.num_classes = num_classes
        self.num_features = embed_dim[-1]
        self.stage_names = tuple(f"layers.{i}" for i in range(len(depth)))
        self.patch_embed = PatchEmbed(patch_size, embed_dim[0], patch_conv_type, in_chans)
        self.cls_token = PatchEmbed(patch_size * window_size, embed_dim[0], "linear", in_chans)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_schedule(drop_path_rate, depth)  # the official float32 linspace, split by stage
        self.layers = nn.LayerList([
            ConvAttBlock(embed_dim[i], embed_dim[i + 1], window_size, depth[i], num_heads[i], mlp_ratio,
                         downsampling[i], norm_layer, dpr[i],
                         attn_drop=attn_drop_rate, drop=drop_rate, peg=peg)
            for i in range(len(depth))])
        self.norm = norm_layer(embed_dim[-1])
        self.head = linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self):
        """Official: nothing by name (see the torch reference)."""
        return set()

    def drop_path_rates(self) -> list:
        """The drop-path rate of every R2L block, in order (0 where the block has none)."""
        return [getattr(blk.drop_path, "drop_prob", 0.0) for layer in self.layers for blk in layer.block[1:]]

    def forward_features(self, x):
        local = self.pos_drop(self.patch_embed(x))
        regional = self.cls_token(x, extra_padding=True)
        for layer in self.layers:
            regional, local = layer(regional, local)
        regional = self.norm(regional.flatten(2).transpose([0, 2, 1]))
        return regional.mean(axis=1)

    def forward(self, x):
        return self.head(self.forward_features(x))


class RegionViTDet(RegionViT):
    """Dense backbone: the ``model`` of the official RegionViTBackbone (detection/detector_wrapper.py:10),
    i.e. the classifier built with det_norm=True (regionvit.py:346-351, 379-395) whose ``norm`` and
    ``head`` the wrapper deletes; state-dict keys without the ``backbone.bottom_up.model.`` prefix.
    After stage i the local tokens pass through LayerNorm2d ``norm{i}`` (eps 1e-5): the normalised
    map is the i-th output (stride 4 * 2**i) AND the next stage's input.  The regional tokens are
    not normalised.  Any input size: see PatchEmbed (regional padding) and to_flat_layout (mask)."""

    def __init__(self, cfg: RegionViTDenseConfig, out_indices=(0, 1, 2, 3), drop_path_rate=None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0):
        if not out_indices or set(out_indices) - {0, 1, 2, 3}:
            raise ValueError(f"out_indices {out_indices!r}: pick stages among 0, 1, 2, 3")
        # None: the detection config's MODEL.BACKBONE.DP_RATE (0.2), as in the torch reference
        rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        super().__init__(**dataclasses.asdict(cfg.backbone), num_classes=0, drop_path_rate=rate,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate)
        del self.norm, self.head  # as the wrapper does
        self.det_norm = cfg.det_norm
        if cfg.det_norm:  # weight 1, bias 0 (LayerNorm2d.reset_parameters); the classifier init skips them
            for i, channels in enumerate(cfg.out_channels):
                self.add_sublayer(f"norm{i}", LayerNorm2d(channels))
        self.out_indices = tuple(sorted(out_indices))
        self.feature_info = [{"channels": cfg.out_channels[i], "stride": cfg.strides[i]} for i in self.out_indices]

    def forward(self, x):
        local = self.pos_drop(self.patch_embed(x))
        regional = self.cls_token(x, extra_padding=True)
        outs = []
        for i, layer in enumerate(self.layers[:max(self.out_indices) + 1]):
            regional, local = layer(regional, local)
            if self.det_norm:
                local = getattr(self, f"norm{i}")(local)
            if i in self.out_indices:
                outs.append(local)
        return outs


DENSE_MODEL = RegionViTDet


# ---------------------------------------------------------------------------
# Variants (configs in model_configs/regionvit.py, the official `_model_cfg`)
# ---------------------------------------------------------------------------

def _create(name: str, pretrained: bool = False, num_classes: int = 1000, **kwargs) -> RegionViT:
    if pretrained:
        raise ValueError("no bundled weights: convert an official RegionViT checkpoint with torch2paddle")
    # RegionViTConfig's fields are RegionViT's leading __init__ parameters, name for name.
    return RegionViT(**dataclasses.asdict(CONFIGS[name]), num_classes=num_classes, **kwargs)


# One factory per variant, under its name and the official `<name>_224` entrypoint name.
def regionvit_tiny(pretrained=False, **kwargs): return _create("regionvit_tiny", pretrained, **kwargs)  # noqa: E704
def regionvit_small(pretrained=False, **kwargs): return _create("regionvit_small", pretrained, **kwargs)  # noqa: E704
def regionvit_medium(pretrained=False, **kwargs): return _create("regionvit_medium", pretrained, **kwargs)  # noqa: E704
def regionvit_base(pretrained=False, **kwargs): return _create("regionvit_base", pretrained, **kwargs)  # noqa: E704
def regionvit_small_w14(pretrained=False, **kwargs): return _create("regionvit_small_w14", pretrained, **kwargs)  # noqa: E704
def regionvit_small_w14_peg(pretrained=False, **kwargs): return _create("regionvit_small_w14_peg", pretrained, **kwargs)  # noqa: E704
def regionvit_base_w14(pretrained=False, **kwargs): return _create("regionvit_base_w14", pretrained, **kwargs)  # noqa: E704
def regionvit_base_w14_peg(pretrained=False, **kwargs): return _create("regionvit_base_w14_peg", pretrained, **kwargs)  # noqa: E704


for _name in CONFIGS:
    globals()[f"{_name}_224"] = globals()[_name]


# Dense backbones (configs: model_configs.regionvit.DENSE_CONFIGS)
def _create_dense(name: str, pretrained: bool = False, **kwargs) -> RegionViTDet:
    if pretrained:
        raise ValueError("no bundled weights: convert an official RegionViT detection checkpoint with torch2paddle")
    return RegionViTDet(DENSE_CONFIGS[name], **kwargs)


def regionvit_small_det(pretrained=False, **kwargs): return _create_dense("regionvit_small_det", pretrained, **kwargs)  # noqa: E704
def regionvit_small_w14_det(pretrained=False, **kwargs): return _create_dense("regionvit_small_w14_det", pretrained, **kwargs)  # noqa: E704
def regionvit_small_w14_peg_det(pretrained=False, **kwargs): return _create_dense("regionvit_small_w14_peg_det", pretrained, **kwargs)  # noqa: E704
def regionvit_base_det(pretrained=False, **kwargs): return _create_dense("regionvit_base_det", pretrained, **kwargs)  # noqa: E704
def regionvit_base_w14_det(pretrained=False, **kwargs): return _create_dense("regionvit_base_w14_det", pretrained, **kwargs)  # noqa: E704
def regionvit_base_w14_peg_det(pretrained=False, **kwargs): return _create_dense("regionvit_base_w14_peg_det", pretrained, **kwargs)  # noqa: E704
