"""FCViT, PyTorch reference ("A Close Look at Spatial Modeling: From Attention to Convolution").

Reproduces the classification models of the official code (ma-xu/FCViT @ 77e5a9d) as the
released checkpoints were trained: same module tree, parameter names and forward numerics.
Variant configs live in ``model_configs/fcvit.py``, shared with the Paddle port.

Training as the official code trains: ``drop_path_rate`` (stochastic depth on both residual
branches of every block, at the official per-block rate; blocks at rate 0 have none) and
``drop_rate`` (the channel mixer's dropout, after the activation and after ``fc2``), both 0 by
default as in every official factory; no attention dropout exists.  Built without weights, a model
is initialised as the official one: convs normal(0, sqrt(2 / fan_out)) with zero bias, Linear
trunc_normal(std .02) with zero bias, norms 1 / 0, layer scale ``layer_scale_init_value``
(1e-5 classification, 1e-6 the dense backbones) -- applied at the same points of construction as
the official code, so the same seed draws the same weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model_configs.fcvit import CONFIGS, DEFAULT_DROP_PATH_RATE, DEFAULT_DROP_RATE, DENSE_CONFIGS, FCViTConfig

from .layers import DropPath
from .registration import register_model

__all__ = ["FCViT", "FCViTFeatures", "FCViTConfig", "CONFIGS", "DENSE_CONFIGS"]


def _init_weights(m):
    """The official ``_init_weights`` of OverlapPatchEmbed, TokenMixer and ChannelMixer
    (models/fcvit.py:116-129, 261-274, 309-322): Linear trunc_normal(.02) / bias 0, GroupNorm 1 / 0,
    Conv2d normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out_channels / groups, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.data.zero_()


def _cls_init_weights(m):
    """BaseFormer.cls_init_weights (462-466), applied to the whole model last: Linear only."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with one group: statistics over (C, H, W) per sample, affine per channel."""

    def __init__(self, num_channels):
        super().__init__(1, num_channels, eps=1e-5)


class OverlapPatchEmbed(nn.Module):
    """Strided conv + BatchNorm: the stem (7x7/4) and the stage transitions (3x3/2)."""

    def __init__(self, in_chans, embed_dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)  # torch defaults: momentum 0.1, eps 1e-5
        self.apply(_init_weights)

    def forward(self, x):
        return self.norm(self.proj(x))


class GlobalContext(nn.Module):
    """Weighted global context: a per-head spatial similarity map, standardised jointly over
    heads and positions, times a channel gate from the "compete" bottleneck."""

    def __init__(self, dim, cfg: FCViTConfig):
        super().__init__()
        self.heads = cfg.gc_heads
        self.scale = (dim // cfg.gc_heads) ** -0.5
        self.eps = cfg.gc_eps
        self.fc1 = nn.Linear(dim, 2 * dim // cfg.gc_reduction)
        self.fc2 = nn.Linear(dim // cfg.gc_reduction, dim)
        self.rescale_weight = nn.Parameter(torch.ones(cfg.gc_heads))
        self.rescale_bias = nn.Parameter(torch.zeros(cfg.gc_heads))

    def channel_gate(self, gap):
        b = gap.shape[0]
        t = self.fc1(gap).reshape(b, 2, -1)
        return self.fc2(t.max(dim=1).values)  # the max over pairs is the only non-linearity

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        gap = x.mean(dim=-1, keepdim=True)
        q = x.reshape(b, self.heads, c // self.heads, h * w)
        g = gap.reshape(b, self.heads, c // self.heads, 1)
        sim = torch.einsum("bhdi,bhjd->bhij", q, g.transpose(-1, -2)).squeeze(-1) * self.scale
        std, mean = torch.std_mean(sim, dim=[1, 2], keepdim=True)  # unbiased, over heads and positions
        sim = (sim - mean) / (std + self.eps)
        sim = sim * self.rescale_weight[None, :, None] + self.rescale_bias[None, :, None]
        sim = sim.reshape(b, self.heads, 1, h, w)
        gate = self.channel_gate(gap.squeeze(-1)).reshape(b, self.heads, -1, 1, 1)
        return (sim * gate).reshape(b, c, h, w)


def _pointwise_bottleneck(dim, width):
    return nn.Sequential(nn.Conv2d(dim, width, 1), nn.GELU(), nn.Conv2d(width, dim, 1))


class TokenMixer(nn.Module):
    """Two rounds of: add global context, large-kernel depthwise conv, 1x1 bottleneck, GELU."""

    def __init__(self, dim, cfg: FCViTConfig):
        super().__init__()
        width = cfg.mix_width(dim)
        k = cfg.mix_kernel
        self.act = nn.GELU()
        self.gc1 = GlobalContext(dim, cfg)
        self.dw1 = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        self.fc1 = _pointwise_bottleneck(dim, width)
        self.gc2 = GlobalContext(dim, cfg)
        self.dw2 = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        self.fc2 = _pointwise_bottleneck(dim, width)
        self.apply(_init_weights)

    def forward(self, x):
        x = x + self.gc1(x)
        x = self.act(self.fc1(self.dw1(x)))
        x = x + self.gc2(x)
        return self.act(self.fc2(self.dw2(x)))


class ChannelMixer(nn.Module):
    """1x1 expand, depthwise 3x3, GELU, 1x1 project (no activation before the depthwise conv);
    one dropout module applied twice, after the GELU and after ``fc2``."""

    def __init__(self, dim, hidden_dim, cfg: FCViTConfig, drop=0.0):
        super().__init__()
        k = cfg.channel_dw_kernel
        self.act = nn.GELU()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, k, padding=k // 2, groups=hidden_dim)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)
        self.apply(_init_weights)

    def forward(self, x):
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class BasicBlock(nn.Module):
    """Pre-norm block; one DropPath module (official: only where its rate is > 0) on both residual
    branches, each call drawing its own mask."""

    def __init__(self, dim, mlp_ratio, cfg: FCViTConfig, drop=0.0, drop_path=0.0, layer_scale_init_value=1e-5):
        super().__init__()
        self.norm1 = GroupNorm(dim)
        self.token_mixer = TokenMixer(dim, cfg)
        self.norm2 = GroupNorm(dim)
        self.channel_mixer = ChannelMixer(dim, int(dim * mlp_ratio), cfg, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

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
    model.network = nn.ModuleList(network)
    model.stage_names = tuple(f"network.{i}" for i in range(0, len(network), 2))


class FCViT(nn.Module):
    """The classification model (official ``BaseFormer``).  ``layer_scale_init_value`` None: the
    variant's (1e-5); the other training arguments default as in the official factories."""

    def __init__(self, cfg: FCViTConfig, num_classes=1000, drop_rate=DEFAULT_DROP_RATE,
                 drop_path_rate=DEFAULT_DROP_PATH_RATE, layer_scale_init_value=None):
        super().__init__()
        self.num_classes = num_classes
        _build_trunk(self, cfg, float(drop_rate), float(drop_path_rate), layer_scale_init_value)
        self.norm = GroupNorm(cfg.embed_dims[-1])
        self.head = nn.Linear(cfg.embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_cls_init_weights)

    def forward_features(self, x):
        x = self.patch_embed(x)
        for layer in self.network:
            x = layer(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x).mean([-2, -1]))


class FCViTFeatures(nn.Module):
    """The dense backbone (official ``fcvit_b*_feat``, ``BaseFormer(fork_feat=True)``): every
    stage's output goes through its own side-branch GroupNorm ``norm{2i}`` (named by its index in
    ``network``) while the unnormalised tensor continues; no final norm, no head.  Any input size."""

    def __init__(self, cfg: FCViTConfig, out_indices=(0, 1, 2, 3), drop_rate=DEFAULT_DROP_RATE,
                 drop_path_rate=DEFAULT_DROP_PATH_RATE, layer_scale_init_value=None):
        super().__init__()
        _build_trunk(self, cfg, float(drop_rate), float(drop_path_rate), layer_scale_init_value)
        self.out_indices = tuple(out_indices)
        for stage in range(len(cfg.layers)):  # all four exist, as in the official model, used or not
            self.add_module(f"norm{2 * stage}", GroupNorm(cfg.embed_dims[stage]))
        self.feature_info = [{"channels": cfg.embed_dims[i], "stride": 4 * 2 ** i} for i in self.out_indices]
        self.apply(_cls_init_weights)

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
        raise ValueError("torch2paddle builds models without downloading weights; load a checkpoint instead")
    return FCViT(CONFIGS[name], num_classes=num_classes, **kwargs)  # an unknown keyword: TypeError


def _create_dense(name, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError("torch2paddle builds models without downloading weights; load a checkpoint instead")
    return FCViTFeatures(DENSE_CONFIGS[name], **kwargs)  # an unknown keyword: TypeError


# One factory per variant, named as the official code names them.
@register_model
def fcvit_tiny(pretrained=False, **kwargs): return _create("fcvit_tiny", pretrained, **kwargs)  # noqa: E704
@register_model
def fcvit_b12(pretrained=False, **kwargs): return _create("fcvit_b12", pretrained, **kwargs)  # noqa: E704
@register_model
def fcvit_b24(pretrained=False, **kwargs): return _create("fcvit_b24", pretrained, **kwargs)  # noqa: E704
@register_model
def fcvit_b48(pretrained=False, **kwargs): return _create("fcvit_b48", pretrained, **kwargs)  # noqa: E704


# The dense backbones (mmdet / mmseg), named as the official classes.
@register_model
def fcvit_b12_feat(pretrained=False, **kwargs): return _create_dense("fcvit_b12_feat", pretrained, **kwargs)  # noqa: E704
@register_model
def fcvit_b24_feat(pretrained=False, **kwargs): return _create_dense("fcvit_b24_feat", pretrained, **kwargs)  # noqa: E704
