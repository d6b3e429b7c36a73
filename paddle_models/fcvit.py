"""FCViT, Paddle port.  Reads side by side with ``reference_torch/fcvit.py``: same classes,
attribute names and order, so parameter names are the official checkpoint's (BatchNorm
running statistics aside: Paddle calls them ``_mean`` / ``_variance``).

Trains as the official model does: ``drop_path_rate`` / ``drop_rate`` as in the reference, BatchNorm
``numerics.BatchNorm2D`` (torch's momentum 0.1 and unbiased running-variance update, eps 1e-5), and
built without weights initialised as the official code initialises (see the reference's docstring;
Paddle's own defaults would be Xavier / Kaiming-uniform-like).
"""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn

from model_configs.fcvit import CONFIGS, DEFAULT_DROP_PATH_RATE, DEFAULT_DROP_RATE, DENSE_CONFIGS, FCViTConfig

from . import numerics
from .depthwise import DepthwiseConv2D
from .layers import GELU, Conv2D, DropPath, Linear

__all__ = ["FCViT", "FCViTFeatures", "FCViTConfig", "CONFIGS", "DENSE_CONFIGS"]


def _constant(value):
    return nn.initializer.Constant(value)


def conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
    """``nn.Conv2D`` (``layers.Conv2D``: its bias added faster) initialised as the official ``_init_weights``: normal(0, sqrt(2 / fan_out)),
    fan_out = k*k*out_channels / groups, zero bias."""
    fan_out = kernel_size * kernel_size * out_channels // groups
    return Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                     weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_out))),
                     bias_attr=paddle.ParamAttr(initializer=_constant(0.0)))


def depthwise_conv2d(channels, kernel_size):
    """``conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)``, same
    parameters and initialisation, as ``DepthwiseConv2D``: by FFT in dygraph, where Paddle's CPU
    kernel for large depthwise kernels is slow (``paddle_models/depthwise.py``)."""
    fan_out = kernel_size * kernel_size
    return DepthwiseConv2D(channels, kernel_size,
                           weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_out))),
                           bias_attr=paddle.ParamAttr(initializer=_constant(0.0)))


def linear(in_features, out_features):
    """``nn.Linear`` (``layers.Linear``) initialised as the official code: trunc_normal(std .02,
    absolute bounds +-2, as torch's ``trunc_normal_``), zero bias."""
    return Linear(in_features, out_features,
                  weight_attr=paddle.ParamAttr(initializer=nn.initializer.TruncatedNormal(0.0, 0.02, a=-2.0, b=2.0)),
                  bias_attr=paddle.ParamAttr(initializer=_constant(0.0)))


class GroupNorm(numerics.GroupNorm):
    """GroupNorm with one group: statistics over (C, H, W) per sample, affine per channel."""

    def __init__(self, num_channels):
        super().__init__(num_groups=1, num_channels=num_channels, epsilon=1e-5)


class OverlapPatchEmbed(nn.Layer):
    """Strided conv + BatchNorm: the stem (7x7/4) and the stage transitions (3x3/2)."""

    def __init__(self, in_chans, embed_dim, patch_size, stride):
        super().__init__()
        self.proj = conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = numerics.BatchNorm2D(embed_dim, momentum=0.1, epsilon=1e-5)  # torch's BatchNorm2d defaults

    def forward(self, x):
        return self.norm(self.proj(x))


class GlobalContext(nn.Layer):
    """Weighted global context: a per-head spatial similarity map, standardised jointly over
    heads and positions, times a channel gate from the "compete" bottleneck."""

    def __init__(self, dim, cfg: FCViTConfig):
        super().__init__()
        self.heads = cfg.gc_heads
        self.scale = (dim // cfg.gc_heads) ** -0.5
        self.eps = cfg.gc_eps
        self.fc1 = linear(dim, 2 * dim // cfg.gc_reduction)
        self.fc2 = linear(dim // cfg.gc_reduction, dim)
        self.rescale_weight = self.create_parameter([cfg.gc_heads], default_initializer=_constant(1.0))
        self.rescale_bias = self.create_parameter([cfg.gc_heads], default_initializer=_constant(0.0))

    def channel_gate(self, gap):
        """The gate [B, C] from the channel means ``gap`` [B, C]."""
        width = self.fc2.weight.shape[0]
        if paddle.in_dynamic_mode():
            return self.fc2(self.fc1(gap).reshape([-1, 2, width]).max(axis=1))  # the max over pairs: the only non-linearity
        # A traced graph runs the two Linears on [B, 1, 1, features]: Paddle Inference keeps a Linear
        # of 4-D input on its own fc, where oneDNN's took ~0.16 ms a call on these [1, C] rows and a
        # layout conversion after each (fcvit_b12 batch 1, oneDNN fused ops only: 7.8 ms of 49 calls,
        # Paddle's fc 3.1 ms).  The same products and sums.
        t = self.fc1(gap.reshape([-1, 1, 1, gap.shape[-1]])).reshape([-1, 2, width]).max(axis=1)
        return self.fc2(t.reshape([-1, 1, 1, width])).reshape([-1, gap.shape[-1]])

    def forward(self, x):
        _, c, h, w = x.shape
        x = x.reshape([-1, c, h * w])
        gap = numerics.mean(x, axis=-1, keepdim=True)
        q = x.reshape([-1, self.heads, c // self.heads, h * w])
        return self._context(q, gap.reshape([-1, self.heads, c // self.heads, 1])).reshape([-1, c, h, w])

    def added_to(self, x):
        """``x + self(x)``, the token mixer's residual step.  A traced graph reshapes ``x`` once, to the
        heads' [B, heads, d, H * W], and adds there (the same sums): Paddle's static reshape copies a
        tensor that is read again, and ``x`` then is not (fcvit_b12 exported: its GlobalContexts copied
        their input map three times each)."""
        if paddle.in_dynamic_mode():
            return x + self(x)
        _, c, h, w = x.shape
        q = x.reshape([-1, self.heads, c // self.heads, h * w])
        context = self._context(q, numerics.mean(q, axis=-1, keepdim=True))
        # added as [B, C, H, W], both views by then: an add right after the matmul would be fused into
        # oneDNN's matmul, which runs slower here (and converts its output's layout)
        return q.reshape([-1, c, h, w]) + context.reshape([-1, c, h, w])

    def _context(self, q, g):
        """The context [B, heads, d, H * W] of the map ``q`` [B, heads, d, H * W], given ``g``, its mean
        over positions [B, heads, d, 1]."""
        heads, d, positions = q.shape[1:]
        # the official einsum("bhdi,bhjd->bhij") as the GEMM it is: Paddle's einsum copies q transposed
        # first (52 ms of fcvit_b12's batch-8 forward), a matmul reads it transposed in place
        sim = paddle.matmul(q, g, transpose_x=True).squeeze(-1) * self.scale
        std, mean = numerics.std_mean(sim, axis=[1, 2], keepdim=True)  # unbiased, over heads and positions
        sim = (sim - mean) / (std + self.eps)
        sim = sim * self.rescale_weight[None, :, None] + self.rescale_bias[None, :, None]
        gate = self.channel_gate(g.reshape([-1, heads * d])).reshape([-1, heads, d, 1])
        # sim x gate, the outer product per head, as a matmul over an axis of 1: the same products, bit
        # for bit, where Paddle's broadcasting multiply of [B, heads, 1, H, W] by [B, heads, d, 1, 1]
        # takes its slow path (19 ms vs 1.3 ms on fcvit_tiny's first stage at batch 8)
        return paddle.matmul(gate, sim.reshape([-1, heads, 1, positions]))


def _pointwise_bottleneck(dim, width):
    return nn.Sequential(conv2d(dim, width, 1), GELU(in_place=True), conv2d(width, dim, 1))


class TokenMixer(nn.Layer):
    """Two rounds of: add global context, large-kernel depthwise conv, 1x1 bottleneck, GELU."""

    def __init__(self, dim, cfg: FCViTConfig):
        super().__init__()
        width = cfg.mix_width(dim)
        k = cfg.mix_kernel
        self.act = GELU(in_place=True)  # on a conv's fresh output
        self.gc1 = GlobalContext(dim, cfg)
        self.dw1 = depthwise_conv2d(dim, k)
        self.fc1 = _pointwise_bottleneck(dim, width)
        self.gc2 = GlobalContext(dim, cfg)
        self.dw2 = depthwise_conv2d(dim, k)
        self.fc2 = _pointwise_bottleneck(dim, width)

    def forward(self, x):
        x = self.gc1.added_to(x)  # x + gc1(x)
        x = self.act(self.fc1(self.dw1(x)))
        x = self.gc2.added_to(x)  # x + gc2(x)
        return self.act(self.fc2(self.dw2(x)))


class ChannelMixer(nn.Layer):
    """1x1 expand, depthwise 3x3, GELU, 1x1 project (no activation before the depthwise conv);
    one dropout module applied twice, after the GELU and after ``fc2``."""

    def __init__(self, dim, hidden_dim, cfg: FCViTConfig, drop=0.0):
        super().__init__()
        k = cfg.channel_dw_kernel
        self.act = GELU(in_place=True)  # on a conv's fresh output
        self.fc1 = conv2d(dim, hidden_dim, 1)
        self.dwconv = conv2d(hidden_dim, hidden_dim, k, padding=k // 2, groups=hidden_dim)
        self.fc2 = conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)  # mode upscale_in_train: torch's

    def forward(self, x):
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class BasicBlock(nn.Layer):
    """Pre-norm block; one DropPath layer (official: only where its rate is > 0) on both residual
    branches, each call drawing its own mask."""

    def __init__(self, dim, mlp_ratio, cfg: FCViTConfig, drop=0.0, drop_path=0.0, layer_scale_init_value=1e-5):
        super().__init__()
        self.norm1 = GroupNorm(dim)
        self.token_mixer = TokenMixer(dim, cfg)
        self.norm2 = GroupNorm(dim)
        self.channel_mixer = ChannelMixer(dim, int(dim * mlp_ratio), cfg, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale_1 = self.create_parameter([dim], default_initializer=_constant(layer_scale_init_value))
        self.layer_scale_2 = self.create_parameter([dim], default_initializer=_constant(layer_scale_init_value))

    def forward(self, x):
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.channel_mixer(self.norm2(x)))


def _build_trunk(model, cfg: FCViTConfig, drop_rate, drop_path_rate, layer_scale_init_value):
    """The stem and ``network``: stages of blocks (even indices) and downsamplers between them."""
    dims = cfg.embed_dims
    rates = cfg.drop_path_rates(drop_path_rate)
    scale = cfg.layer_scale_init if layer_scale_init_value is None else layer_scale_init_value
    model.patch_embed = OverlapPatchEmbed(3, dims[0], patch_size=7, stride=4)
    network = []
    for i, depth in enumerate(cfg.layers):
        network.append(nn.Sequential(*[
            BasicBlock(dims[i], cfg.mlp_ratios[i], cfg, drop=drop_rate, drop_path=rates[i][j],
                       layer_scale_init_value=scale) for j in range(depth)]))
        if i + 1 < len(cfg.layers):
            network.append(OverlapPatchEmbed(dims[i], dims[i + 1], patch_size=3, stride=2))
    model.network = nn.LayerList(network)
    model.stage_names = tuple(f"network.{i}" for i in range(0, len(network), 2))


class FCViT(nn.Layer):
    """The classification model (official ``BaseFormer``); arguments as the reference's."""

    def __init__(self, cfg: FCViTConfig, num_classes=1000, drop_rate=DEFAULT_DROP_RATE,
                 drop_path_rate=DEFAULT_DROP_PATH_RATE, layer_scale_init_value=None):
        super().__init__()
        self.num_classes = num_classes
        _build_trunk(self, cfg, float(drop_rate), float(drop_path_rate), layer_scale_init_value)
        self.norm = GroupNorm(cfg.embed_dims[-1])
        self.head = linear(cfg.embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        for layer in self.network:
            x = layer(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(numerics.mean(self.forward_features(x), axis=[-2, -1]))


class FCViTFeatures(nn.Layer):
    """The dense backbone: each stage's output through its side-branch GroupNorm ``norm{2i}``."""

    def __init__(self, cfg: FCViTConfig, out_indices=(0, 1, 2, 3), drop_rate=DEFAULT_DROP_RATE,
                 drop_path_rate=DEFAULT_DROP_PATH_RATE, layer_scale_init_value=None):
        super().__init__()
        _build_trunk(self, cfg, float(drop_rate), float(drop_path_rate), layer_scale_init_value)
        self.out_indices = tuple(out_indices)
        for stage in range(len(cfg.layers)):
            self.add_sublayer(f"norm{2 * stage}", GroupNorm(cfg.embed_dims[stage]))
        self.feature_info = [{"channels": cfg.embed_dims[i], "stride": 4 * 2 ** i} for i in self.out_indices]

    def forward(self, x):
        x = self.patch_embed(x)
        outs = []
        for idx, layer in enumerate(self.network):
            x = layer(x)
            if idx % 2 == 0 and idx // 2 in self.out_indices:
                outs.append(getattr(self, f"norm{idx}")(x))
        return outs


DENSE_MODEL = FCViTFeatures


def _create(name, pretrained=False, num_classes=1000, **kwargs):
    if pretrained:
        raise ValueError("torch2paddle builds models without downloading weights; load converted weights instead")
    return FCViT(CONFIGS[name], num_classes=num_classes, **kwargs)  # an unknown keyword: TypeError


def _create_dense(name, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError("torch2paddle builds models without downloading weights; load converted weights instead")
    return FCViTFeatures(DENSE_CONFIGS[name], **kwargs)  # an unknown keyword: TypeError


# One factory per variant, named as the official code names them.
def fcvit_tiny(pretrained=False, **kwargs): return _create("fcvit_tiny", pretrained, **kwargs)  # noqa: E704
def fcvit_b12(pretrained=False, **kwargs): return _create("fcvit_b12", pretrained, **kwargs)  # noqa: E704
def fcvit_b24(pretrained=False, **kwargs): return _create("fcvit_b24", pretrained, **kwargs)  # noqa: E704
def fcvit_b48(pretrained=False, **kwargs): return _create("fcvit_b48", pretrained, **kwargs)  # noqa: E704


# The dense backbones (mmdet / mmseg), named as the official classes.
def fcvit_b12_feat(pretrained=False, **kwargs): return _create_dense("fcvit_b12_feat", pretrained, **kwargs)  # noqa: E704
def fcvit_b24_feat(pretrained=False, **kwargs): return _create_dense("fcvit_b24_feat", pretrained, **kwargs)  # noqa: E704
