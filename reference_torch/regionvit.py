"""RegionViT: regional-to-local attention vision transformer (PyTorch reference).

Reference for "RegionViT: Regional-to-Local Attention for Vision Transformers"
(Chen, Panda, Fan; ICLR 2022), official code IBM/RegionViT @ 77000c2.  It rebuilds
the official ImageNet models with the official state-dict keys and numerics;
``paddle_models/regionvit.py`` mirrors it class for class.

Two token sets flow through four stages: *regional* tokens (one per ws x ws
window, from a conv with kernel = stride = 4 * ws on the image) and *local*
tokens (from the stem).  Each R2L block runs self-attention over the regional
tokens of an image, then, per window, attention over [its regional token, its
ws * ws local tokens] with a relative position bias, then an MLP.

Numerics that the port must keep (see the family fact sheet):
* one ``attn`` module serves both the regional and the local attention; only the
  norm in front differs (``norm0`` vs ``norm1``);
* the relative position index uses the official wrap-around layout
  (offset ws // 2, negative indices wrapping modulo 2 * ws - 1), not Swin's;
* when the local grid is not ws times the regional grid, local tokens are
  zero-padded at the bottom/right and the attention is masked with the official
  mask, quirk included: in the bottom-right window a valid query may still
  attend to right- and bottom-padded keys, only the corner block is masked;
* ``Projection.proj_cls`` is the very module ``Projection.proj``, so the state
  dict holds both prefixes;
* the regional stem pads the image symmetrically when H or W is not a multiple of
  4 * ws, and then pads BOTH axes by ``4 * ws - size % (4 * ws)``: an axis that was
  already a multiple gains a whole patch (``regional_padding``).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_configs.regionvit import (CONFIGS, DENSE_CONFIGS, RegionViTDenseConfig, regional_padding, rel_pos_index,
                                     window_mask)

from .layers import DropPath, drop_path_schedule
from .registration import register_model

__all__ = ["RegionViT", "RegionViTDet", "DENSE_MODEL"]


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------

class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor; affine params shaped (1, C, 1, 1)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        std = torch.sqrt(x.var(1, unbiased=False, keepdim=True) + self.eps)
        return (x - mean) / std * self.weight + self.bias


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Image -> tokens.  '3conv' / '1conv' make the local tokens (stride 4), 'linear' the regional ones."""

    def __init__(self, patch_size: int, embed_dim: int, conv_type: str, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        if conv_type == "3conv":
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, embed_dim // 4, 3, stride=2, padding=1),
                LayerNorm2d(embed_dim // 4),
                nn.GELU(),
                nn.Conv2d(embed_dim // 4, embed_dim // 2, 3, stride=2, padding=1),
                LayerNorm2d(embed_dim // 2),
                nn.GELU(),
                nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=1, padding=1),
            )
        elif conv_type == "1conv":
            self.proj = nn.Conv2d(in_chans, embed_dim, 2 * patch_size, stride=patch_size, padding=patch_size - 1)
        elif conv_type == "linear":
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        else:
            raise ValueError(f"unknown patch conv type {conv_type!r}")

    def forward(self, x, extra_padding: bool = False):
        if extra_padding:
            padding = regional_padding(x.shape[2], x.shape[3], self.patch_size)  # official quirk included
            if any(padding):
                x = F.pad(x, padding)
        return self.proj(x)


class AttentionWithRelPos(nn.Module):
    """Multi-head attention; with ``patch_attn`` adds the relative position bias among local tokens."""

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos = nn.Parameter(torch.zeros(num_heads, (2 * window_size - 1) ** 2))
        nn.init.trunc_normal_(self.rel_pos, std=0.02)  # attention_variants.py:40
        self.register_buffer("rel_pos_index", torch.tensor(rel_pos_index(window_size)), persistent=False)

    def forward(self, x, patch_attn: bool = False, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if patch_attn:
            n = self.window_size ** 2
            bias = self.rel_pos[:, self.rel_pos_index].reshape(self.num_heads, n, n)
            attn = attn + F.pad(bias, (N - n, 0, N - n, 0))  # nothing added for the regional token
        if mask is not None:
            attn = attn.masked_fill(mask, torch.finfo(attn.dtype).min)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class R2LAttentionPlusFFN(nn.Module):
    """Regional self-attention, then regional-to-local attention per window, then an MLP.  One
    drop-path module (official: only where the block's rate is > 0, regionvit.py:97) on all three
    residual branches, each call drawing its own per-sample mask; ``drop`` is the attention's
    output dropout and the MLP's, ``attn_drop`` the dropout on the attention weights."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, norm_layer,
                 drop_path: float = 0.0, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.norm0 = norm_layer(dim)
        self.norm1 = norm_layer(dim)
        self.attn = AttentionWithRelPos(dim, num_heads, window_size, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, batch: int, mask=None):
        C = x.shape[-1]
        regional = x[:, 0:1].reshape(batch, -1, C)  # (B, windows, C)
        regional = regional + self.drop_path(self.attn(self.norm0(regional)))
        x = torch.cat([regional.reshape(-1, 1, C), x[:, 1:]], dim=1)
        x = x + self.drop_path(self.attn(self.norm1(x), patch_attn=True, mask=mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Projection(nn.Module):
    """Stage entry, shared by both token sets: identity, or LayerNorm2d-GELU-depthwise x2 conv with stride 2."""

    def __init__(self, in_dim: int, out_dim: int, mode: str):
        super().__init__()
        if mode == "c" and in_dim == out_dim:
            self.proj = nn.Sequential(nn.Identity())
        elif mode == "sc":
            self.proj = nn.Sequential(
                LayerNorm2d(in_dim),
                nn.GELU(),
                nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, groups=in_dim),
            )
        else:
            raise ValueError(f"unsupported downsampling {mode!r} for {in_dim} -> {out_dim} channels")
        self.proj_cls = self.proj  # one module under two names, as in the official model

    def forward(self, regional, local):
        return self.proj_cls(regional), self.proj(local)


def to_flat_layout(regional, local, ws: int):
    """(B, C, Hr, Wr) and (B, C, H, W) -> (B * Hr * Wr, 1 + ws^2, C) and the attention mask (or None)."""
    B, C, H, W = local.shape
    rows, cols = regional.shape[2:]
    pad_b, pad_r = rows * ws - H, cols * ws - W
    mask = None
    if pad_b or pad_r:
        local = F.pad(local, (0, pad_r, 0, pad_b))
        blocked = torch.from_numpy(window_mask(rows, cols, ws, pad_b, pad_r).copy()).to(local.device)
        mask = blocked.repeat(B, 1, 1).unsqueeze(1)  # (B * windows, 1, N, N), broadcast over heads
    local = local.reshape(B, C, rows, ws, cols, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, C)
    regional = regional.flatten(2).transpose(1, 2).reshape(-1, 1, C)
    return torch.cat([regional, local], dim=1), mask


def to_spatial_layout(x, batch: int, rows: int, cols: int, size: tuple, ws: int):
    """Inverse of ``to_flat_layout``; crops the padding back to ``size`` = (H, W)."""
    C = x.shape[-1]
    regional = x[:, 0].reshape(batch, rows, cols, C).permute(0, 3, 1, 2)
    local = x[:, 1:].reshape(batch, rows, cols, ws, ws, C).permute(0, 5, 1, 3, 2, 4)
    # contiguous like the official F.fold output: the next LayerNorm2d's reductions depend on the layout
    local = local.reshape(batch, C, rows * ws, cols * ws).contiguous()[:, :, :size[0], :size[1]]
    return regional, local


class ConvAttBlock(nn.Module):
    """One stage: ``block.0`` is the Projection, ``block.1..depth`` the R2L blocks; optional PEG after the first."""

    def __init__(self, in_dim: int, out_dim: int, window_size: int, depth: int, num_heads: int, mlp_ratio: float,
                 downsampling: str, norm_layer, drop_path: tuple, attn_drop: float = 0.0, drop: float = 0.0,
                 peg: bool = False):
        super().__init__()
        self.window_size = window_size
        self.block = nn.ModuleList(
            [Projection(in_dim, out_dim, downsampling)]
            + [R2LAttentionPlusFFN(out_dim, num_heads, window_size, mlp_ratio, norm_layer,
                                   drop_path=drop_path[i], attn_drop=attn_drop, drop=drop) for i in range(depth)])
        self.peg = nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim, bias=False) if peg else None

    def forward(self, regional, local):
        ws = self.window_size
        regional, local = self.block[0](regional, local)
        B, _, rows, cols = regional.shape
        size = tuple(local.shape[2:])
        x, mask = to_flat_layout(regional, local, ws)
        for i in range(1, len(self.block)):
            x = self.block[i](x, B, mask)
            if self.peg is not None and i == 1:
                regional, local = to_spatial_layout(x, B, rows, cols, size, ws)
                x, mask = to_flat_layout(regional + self.peg(regional), local + self.peg(local), ws)
        return to_spatial_layout(x, B, rows, cols, size, ws)


class RegionViT(nn.Module):
    """RegionViT.  ``layers[i]`` returns (regional, local) tokens; the head pools the last regional tokens.

    Training arguments, official defaults (regionvit.py:294-296; the factories pass nothing else):
    ``drop_rate`` 0 (``pos_drop`` on the local tokens after the stem, the attention's ``proj_drop``
    and the MLP's dropout; none before the head), ``attn_drop_rate`` 0 (on the attention weights),
    ``drop_path_rate`` 0 (per block ``torch.linspace(0, rate, sum(depth))`` in block order over all
    stages, regionvit.py:324; the ImageNet recipe passes --drop-path 0.1, main.py:45).
    Built without weights it is initialised as the official ``_init_weights`` (regionvit.py:356):
    Linear trunc_normal_(std .02) with zero bias, LayerNorm / LayerNorm2d weight 1 bias 0, ``rel_pos``
    trunc_normal_(std .02); convolutions keep torch's default (kaiming_uniform(a=sqrt(5)) weight,
    uniform(+-1/sqrt(fan_in)) bias)."""

    def __init__(self, embed_dim=(96, 96, 192, 384, 768), depth=(2, 2, 8, 2), num_heads=(3, 6, 12, 24),
                 window_size: int = 7, patch_conv_type: str = "3conv", peg: bool = False, num_classes: int = 1000,
                 patch_size: int = 4, in_chans: int = 3, mlp_ratio: float = 4.0,
                 downsampling=("c", "sc", "sc", "sc"), drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        norm_layer = functools.partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.num_features = embed_dim[-1]
        self.stage_names = tuple(f"layers.{i}" for i in range(len(depth)))
        self.patch_embed = PatchEmbed(patch_size, embed_dim[0], patch_conv_type, in_chans)
        self.cls_token = PatchEmbed(patch_size * window_size, embed_dim[0], "linear", in_chans)
        self.pos_drop = nn.Dropout(drop_rate)
        with torch.device("cpu"):  # python floats, also when the model is built on the meta device
            dpr = drop_path_schedule(drop_path_rate, depth)  # the official float32 linspace, split by stage
        self.layers = nn.ModuleList([
            ConvAttBlock(embed_dim[i], embed_dim[i + 1], window_size, depth[i], num_heads[i], mlp_ratio,
                         downsampling[i], norm_layer, dpr[i],
                         attn_drop=attn_drop_rate, drop=drop_rate, peg=peg)
            for i in range(len(depth))])
        self.norm = norm_layer(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        """Official (regionvit.py:365-370, computed_cls_token=True): nothing by name, so timm's
        create_optimizer decays every parameter except 1-D ones and names ending in ``.bias``."""
        return set()

    def drop_path_rates(self) -> list:
        """The drop-path rate of every R2L block, in order (0 where the block has none)."""
        return [getattr(blk.drop_path, "drop_prob", 0.0) for layer in self.layers for blk in layer.block[1:]]

    def forward_features(self, x):
        local = self.pos_drop(self.patch_embed(x))
        regional = self.cls_token(x, extra_padding=True)
        for layer in self.layers:
            regional, local = layer(regional, local)
        regional = self.norm(regional.flatten(2).transpose(1, 2))
        return regional.mean(dim=1)

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
        # None: the detection config's MODEL.BACKBONE.DP_RATE (0.2); drop_rate / attn_drop_rate: the
        # classifier's defaults, which the official RegionViTBackbone does not override
        rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        super().__init__(**dataclasses.asdict(cfg.backbone), num_classes=0, drop_path_rate=rate,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate)
        del self.norm, self.head  # as the wrapper does
        self.det_norm = cfg.det_norm
        if cfg.det_norm:  # weight 1, bias 0 (LayerNorm2d.reset_parameters); the classifier init skips them
            for i, channels in enumerate(cfg.out_channels):
                self.add_module(f"norm{i}", LayerNorm2d(channels))
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
@register_model
def regionvit_tiny(pretrained=False, **kwargs): return _create("regionvit_tiny", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_small(pretrained=False, **kwargs): return _create("regionvit_small", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_medium(pretrained=False, **kwargs): return _create("regionvit_medium", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_base(pretrained=False, **kwargs): return _create("regionvit_base", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_small_w14(pretrained=False, **kwargs): return _create("regionvit_small_w14", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_small_w14_peg(pretrained=False, **kwargs): return _create("regionvit_small_w14_peg", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_base_w14(pretrained=False, **kwargs): return _create("regionvit_base_w14", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_base_w14_peg(pretrained=False, **kwargs): return _create("regionvit_base_w14_peg", pretrained, **kwargs)  # noqa: E704


def _official_name(factory):
    """Register ``factory`` with timm again under the official ``<name>_224`` entrypoint name."""
    def alias(pretrained=False, **kwargs):
        return factory(pretrained=pretrained, **kwargs)
    alias.__name__ = alias.__qualname__ = f"{factory.__name__}_224"
    alias.__doc__ = f"Official name of ``{factory.__name__}``."
    return register_model(alias)


for _name in CONFIGS:
    globals()[f"{_name}_224"] = _official_name(globals()[_name])


# Dense backbones (configs: model_configs.regionvit.DENSE_CONFIGS)
def _create_dense(name: str, pretrained: bool = False, **kwargs) -> RegionViTDet:
    if pretrained:
        raise ValueError("no bundled weights: convert an official RegionViT detection checkpoint with torch2paddle")
    return RegionViTDet(DENSE_CONFIGS[name], **kwargs)


@register_model
def regionvit_small_det(pretrained=False, **kwargs): return _create_dense("regionvit_small_det", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_small_w14_det(pretrained=False, **kwargs): return _create_dense("regionvit_small_w14_det", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_small_w14_peg_det(pretrained=False, **kwargs): return _create_dense("regionvit_small_w14_peg_det", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_base_det(pretrained=False, **kwargs): return _create_dense("regionvit_base_det", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_base_w14_det(pretrained=False, **kwargs): return _create_dense("regionvit_base_w14_det", pretrained, **kwargs)  # noqa: E704
@register_model
def regionvit_base_w14_peg_det(pretrained=False, **kwargs): return _create_dense("regionvit_base_w14_peg_det", pretrained, **kwargs)  # noqa: E704
