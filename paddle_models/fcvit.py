"""FCViT, Paddle port.  Reads side by side with ``reference_torch/fcvit.py``: same classes,
attribute names and order, so parameter names are the official checkpoint's (BatchNorm
running statistics aside: Paddle calls them ``_mean`` / ``_variance``).

Inference only: dropout and drop-path are left out.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from model_configs.fcvit import CONFIGS, DENSE_CONFIGS, FCViTConfig

from . import numerics

__all__ = ["FCViT", "FCViTFeatures", "FCViTConfig", "CONFIGS", "DENSE_CONFIGS"]


def _constant(value):
    return nn.initializer.Constant(value)


class GroupNorm(numerics.GroupNorm):
    """GroupNorm with one group: statistics over (C, H, W) per sample, affine per channel."""

    def __init__(self, num_channels):
        super().__init__(num_groups=1, num_channels=num_channels, epsilon=1e-5)


class OverlapPatchEmbed(nn.Layer):
    """Strided conv + BatchNorm: the stem (7x7/4) and the stage transitions (3x3/2)."""

    def __init__(self, in_chans, embed_dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2D(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2D(embed_dim, epsilon=1e-5)

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
        self.fc1 = nn.Linear(dim, 2 * dim // cfg.gc_reduction)
        self.fc2 = nn.Linear(dim // cfg.gc_reduction, dim)
        self.rescale_weight = self.create_parameter([cfg.gc_heads], default_initializer=_constant(1.0))
        self.rescale_bias = self.create_parameter([cfg.gc_heads], default_initializer=_constant(0.0))

    def channel_gate(self, gap):
        b = gap.shape[0]
        t = self.fc1(gap).reshape([b, 2, -1])
        return self.fc2(t.max(axis=1))  # the max over pairs is the only non-linearity

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape([b, c, h * w])
        gap = numerics.mean(x, axis=-1, keepdim=True)
        q = x.reshape([b, self.heads, c // self.heads, h * w])
        g = gap.reshape([b, self.heads, c // self.heads, 1])
        sim = paddle.einsum("bhdi,bhjd->bhij", q, g.transpose([0, 1, 3, 2])).squeeze(-1) * self.scale
        std, mean = numerics.std_mean(sim, axis=[1, 2], keepdim=True)  # unbiased, over heads and positions
        sim = (sim - mean) / (std + self.eps)
        sim = sim * self.rescale_weight[None, :, None] + self.rescale_bias[None, :, None]
        sim = sim.reshape([b, self.heads, 1, h, w])
        gate = self.channel_gate(gap.squeeze(-1)).reshape([b, self.heads, -1, 1, 1])
        return (sim * gate).reshape([b, c, h, w])


def _pointwise_bottleneck(dim, width):
    return nn.Sequential(nn.Conv2D(dim, width, 1), nn.GELU(), nn.Conv2D(width, dim, 1))


class TokenMixer(nn.Layer):
    """Two rounds of: add global context, large-kernel depthwise conv, 1x1 bottleneck, GELU."""

    def __init__(self, dim, cfg: FCViTConfig):
        super().__init__()
        width = cfg.mix_width(dim)
        k = cfg.mix_kernel
        self.act = nn.GELU()
        self.gc1 = GlobalContext(dim, cfg)
        self.dw1 = nn.Conv2D(dim, dim, k, padding=k // 2, groups=dim)
        self.fc1 = _pointwise_bottleneck(dim, width)
        self.gc2 = GlobalContext(dim, cfg)
        self.dw2 = nn.Conv2D(dim, dim, k, padding=k // 2, groups=dim)
        self.fc2 = _pointwise_bottleneck(dim, width)

    def forward(self, x):
        x = x + self.gc1(x)
        x = self.act(self.fc1(self.dw1(x)))
        x = x + self.gc2(x)
        return self.act(self.fc2(self.dw2(x)))


class ChannelMixer(nn.Layer):
    """1x1 expand, depthwise 3x3, GELU, 1x1 project (no activation before the depthwise conv)."""

    def __init__(self, dim, hidden_dim, cfg: FCViTConfig):
        super().__init__()
        k = cfg.channel_dw_kernel
        self.act = nn.GELU()
        self.fc1 = nn.Conv2D(dim, hidden_dim, 1)
        self.dwconv = nn.Conv2D(hidden_dim, hidden_dim, k, padding=k // 2, groups=hidden_dim)
        self.fc2 = nn.Conv2D(hidden_dim, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class BasicBlock(nn.Layer):
    def __init__(self, dim, mlp_ratio, cfg: FCViTConfig):
        super().__init__()
        self.norm1 = GroupNorm(dim)
        self.token_mixer = TokenMixer(dim, cfg)
        self.norm2 = GroupNorm(dim)
        self.channel_mixer = ChannelMixer(dim, int(dim * mlp_ratio), cfg)
        self.layer_scale_1 = self.create_parameter([dim], default_initializer=_constant(cfg.layer_scale_init))
        self.layer_scale_2 = self.create_parameter([dim], default_initializer=_constant(cfg.layer_scale_init))

    def forward(self, x):
        x = x + self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2[:, None, None] * self.channel_mixer(self.norm2(x))


def _build_trunk(model, cfg: FCViTConfig):
    """The stem and ``network``: stages of blocks (even indices) and downsamplers between them."""
    dims = cfg.embed_dims
    model.patch_embed = OverlapPatchEmbed(3, dims[0], patch_size=7, stride=4)
    network = []
    for i, depth in enumerate(cfg.layers):
        network.append(nn.Sequential(*[BasicBlock(dims[i], cfg.mlp_ratios[i], cfg) for _ in range(depth)]))
        if i + 1 < len(cfg.layers):
            network.append(OverlapPatchEmbed(dims[i], dims[i + 1], patch_size=3, stride=2))
    model.network = nn.LayerList(network)
    model.stage_names = tuple(f"network.{i}" for i in range(0, len(network), 2))


class FCViT(nn.Layer):
    def __init__(self, cfg: FCViTConfig, num_classes=1000):
        super().__init__()
        self.num_classes = num_classes
        _build_trunk(self, cfg)
        self.norm = GroupNorm(cfg.embed_dims[-1])
        self.head = nn.Linear(cfg.embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        for layer in self.network:
            x = layer(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(numerics.mean(self.forward_features(x), axis=[-2, -1]))


class FCViTFeatures(nn.Layer):
    """The dense backbone: each stage's output through its side-branch GroupNorm ``norm{2i}``."""

    def __init__(self, cfg: FCViTConfig, out_indices=(0, 1, 2, 3)):
        super().__init__()
        _build_trunk(self, cfg)
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
    return FCViT(CONFIGS[name], num_classes=num_classes)


def _create_dense(name, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError("torch2paddle builds models without downloading weights; load converted weights instead")
    return FCViTFeatures(DENSE_CONFIGS[name], **kwargs)


# One factory per variant, named as the official code names them.
def fcvit_tiny(pretrained=False, **kwargs): return _create("fcvit_tiny", pretrained, **kwargs)  # noqa: E704
def fcvit_b12(pretrained=False, **kwargs): return _create("fcvit_b12", pretrained, **kwargs)  # noqa: E704
def fcvit_b24(pretrained=False, **kwargs): return _create("fcvit_b24", pretrained, **kwargs)  # noqa: E704
def fcvit_b48(pretrained=False, **kwargs): return _create("fcvit_b48", pretrained, **kwargs)  # noqa: E704


# The dense backbones (mmdet / mmseg), named as the official classes.
def fcvit_b12_feat(pretrained=False, **kwargs): return _create_dense("fcvit_b12_feat", pretrained, **kwargs)  # noqa: E704
def fcvit_b24_feat(pretrained=False, **kwargs): return _create_dense("fcvit_b24_feat", pretrained, **kwargs)  # noqa: E704
