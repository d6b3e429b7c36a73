"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

PyTorch reference for the ImageNet-1k models released in rayleizhu/BiFormer: biformer_tiny,
biformer_small, biformer_base (models/biformer.py, legacy BRA from ops/bra_legacy.py) and the
Swin-Tiny-layout ablations biformer_stl (legacy BRA) and biformer_stl_nchw (ops/bra_nchw.py);
and the dense backbones biformer_{small,base}_{det,seg} (``BiFormer_mm``, models_mm/biformer_mm.py
of object_detection/ and semantic_segmentation/): any input size through the BRA's auto_pad.
State-dict keys and shapes are the official ones; numerics follow the official operation order
(region means, then scaled query @ key^T, then a hard top-k).

Training as the official code trains: stochastic depth on both residual branches of every block
(``drop_path_rate``, linspace over all blocks, timm's DropPath from ``layers``), the official
initialisation (``_init_weights``), the routing computed on detached region descriptors (hard,
non-differentiable top-k: no gradient reaches q, k through the routing, only through the
attention), and the detection backbones' frozen BatchNorm (``norm_eval``).  The official models
have no dropout: ``drop_rate`` is accepted, as they accept it, and unused.

Bi-Level Routing Attention here gathers the routed key/value regions with one index_select over a
(batch x region) axis, so the gathered tensors hold topk regions per query region, never p^2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_configs.biformer import CONFIGS, DENSE_CONFIGS, BiFormerConfig, dense_factory_kwargs

from .layers import DropPath, drop_path_schedule
from .registration import register_model

__all__ = ["BiFormer", "BiFormerSTL", "BiFormerDense", "biformer_tiny", "biformer_small", "biformer_base",
           "biformer_stl", "biformer_stl_nchw", "biformer_small_det", "biformer_base_det", "biformer_small_seg",
           "biformer_base_seg"]


# ---------------------------------------------------------------------------------------------
# Region/head layout helpers.  Regions are numbered row-major (region = row * n_win + col) and
# channels split head-major (channel = head * head_dim + j), as in the official code.  Attention
# runs on a heads-first layout (heads, batch * regions, tokens, head_dim) so that the routed
# gather lands directly in the layout the matmuls read.
# ---------------------------------------------------------------------------------------------

def _permute(x, perm):
    """``x.permute(perm)`` (a view; the Paddle port materialises its permutations)."""
    return x.permute(*perm)


def _nhwc_to_windows(x, n_win):
    """(N, H, W, C) -> (N, n_win^2, H/n_win, W/n_win, C)."""
    n, hh, ww, c = x.shape
    h, w = hh // n_win, ww // n_win
    return _permute(x.reshape(n * n_win, h, n_win, w * c), [0, 2, 1, 3]).reshape(n, n_win * n_win, h, w, c)


def _windows_to_nchw(x, n_win):
    """(N, n_win^2, h, w, C) -> (N, C, n_win * h, n_win * w)."""
    n, _, h, w, c = x.shape
    return _permute(x.reshape(n, n_win, n_win, h, w, c), [0, 5, 1, 3, 2, 4]).reshape(n, c, n_win * h, n_win * w)


def _windows_to_heads(x, groups, num_heads):
    """(N, P, h, w, G * C) -> (G, heads, N * P, h * w, C / heads) for G stacked projections
    (G = 3 for a fused q | k | v)."""
    n, p, h, w, gc = x.shape
    d = gc // (groups * num_heads)
    x = _permute(x.reshape(n * p, h * w, groups * num_heads, d), [2, 0, 1, 3])
    return x.reshape(groups, num_heads, n * p, h * w, d)


def _nhwc_to_heads(x, n_win, groups, num_heads):
    """(N, H, W, G * C) -> (G, heads, N * P, h * w, C / heads): window partition and head split
    in one permutation."""
    n, hh, ww, gc = x.shape
    h, w = hh // n_win, ww // n_win
    d = gc // (groups * num_heads)
    x = _permute(x.reshape(n * n_win, h, n_win, w, groups * num_heads, d), [4, 0, 2, 1, 3, 5])
    return x.reshape(groups, num_heads, n * n_win * n_win, h * w, d)


def _heads_to_nhwc(x, n, n_win, h, w):
    """(heads, N * P, h * w, d) -> (N, n_win * h, n_win * w, heads * d)."""
    m, _, _, d = x.shape
    x = _permute(x.reshape(m, n * n_win, n_win, h, w, d), [1, 3, 2, 4, 0, 5])
    return x.reshape(n, n_win * h, n_win * w, m * d)


def _check_input(cfg: BiFormerConfig, x):
    problem = cfg.input_problem(x.shape[-2], x.shape[-1])
    if problem:
        raise ValueError(f"BiFormer: {problem}")


# ---------------------------------------------------------------------------------------------
# Bi-Level Routing Attention
# ---------------------------------------------------------------------------------------------

class TopkRouting(nn.Module):
    """Region-to-region routing: a hard top-k over region-level query/key affinities.

    forward(query, key), both (N, P, C) region descriptors, returns ``(logits, index)``:
    logits (N, P, P) = (query * scale) @ key^T (scale None: unscaled, as in the NCHW BRA), and
    index (N, P, topk) int64, the selected key regions of each query region, best first.
    Models list every TopkRouting in ``routing_modules`` so parity checks can hook them.
    The descriptors are detached, as the official router does without diff_routing (every
    released model): the routing takes no part in backward.
    """

    def __init__(self, topk: int, scale=None):
        super().__init__()
        self.topk = topk
        self.scale = scale

    def forward(self, query, key):
        query, key = query.detach(), key.detach()
        if self.scale is not None:
            query = query * self.scale
        logits = query @ key.transpose(-2, -1)
        index = torch.topk(logits, k=self.topk, dim=-1).indices
        return logits, index


class KVGather(nn.Module):
    """Gather the routed regions' keys and values for every query region.

    k, v: (heads, N * P, tokens, d); index: (N, P, topk).  Returns k, v of shape
    (heads, N * P, topk * tokens, d).  One index_select over the (batch x region) axis: only the
    topk selected regions are copied, nothing is expanded to P regions per query region.
    """

    def forward(self, index, k, v):
        n, p, topk = index.shape
        offsets = torch.arange(n, device=index.device).view(n, 1, 1) * p
        flat = (index + offsets).reshape(-1)

        def take(t):
            m, _, tokens, d = t.shape
            return t.index_select(1, flat).reshape(m, n * p, topk * tokens, d)

        return take(k), take(v)


def _routed_attention(q, k, v, index, scale, kv_gather):
    """Token-to-token attention of each query region over its routed regions (heads-first)."""
    k, v = kv_gather(index, k, v)
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


class QKVLinear(nn.Module):
    """One Linear producing q (qk_dim), k (qk_dim) and v (dim) channels, concatenated."""

    def __init__(self, dim: int, qk_dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x):
        return self.qkv(x)


class BiLevelRoutingAttention(nn.Module):
    """Legacy BRA (ops/bra_legacy.py) on NHWC input, as every released NHWC model uses it:
    identity kv downsampling, hard non-differentiable routing, scale = qk_dim^-0.5 for both the
    routing and the token attention, LePE on v, output Linear ``wo``.

    ``auto_pad`` (the dense backbones, bra_legacy.py:212-225 and 276-279): the input is
    zero-padded bottom/right to a multiple of n_win and everything above runs on the padded map
    without a mask (padded tokens are Linear(0) = the qkv bias: they shape the region means,
    are routed to, attended to, and feed the LePE conv at the border); the output is cropped.
    Windows made only of padding hold identical keys and values, so their exact ties in the
    top-k routing cannot change the output, whichever of them a framework's top-k picks."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int,
                 auto_pad: bool = False):
        super().__init__()
        self.dim = dim
        self.qk_dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.scale = self.qk_dim ** -0.5
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.router = TopkRouting(topk, scale=self.scale)
        self.kv_gather = KVGather()
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim)
        self.auto_pad = auto_pad

    def forward(self, x):
        n, h_in, w_in, _ = x.shape
        s, m = self.n_win, self.num_heads
        pad_b, pad_r = ((-h_in) % s, (-w_in) % s) if self.auto_pad else (0, 0)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (C, W, H): zeros at the right and bottom
        h, w = (h_in + pad_b) // s, (w_in + pad_r) // s
        qkv = self.qkv(_nhwc_to_windows(x, s))  # (N, P, h, w, 3C): q | k | v
        q_win, k_win, v_win = qkv.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        _, index = self.router(q_win.mean([2, 3]), k_win.mean([2, 3]))
        lepe = self.lepe(_windows_to_nchw(v_win, s))
        q, k, v = _windows_to_heads(qkv, 3, m).unbind(0)  # each (heads, N * P, h * w, d)
        out = _routed_attention(q, k, v, index, self.scale, self.kv_gather)
        out = self.wo(_heads_to_nhwc(out, n, s, h, w) + _permute(lepe, [0, 2, 3, 1]))
        return out[:, :h_in, :w_in].contiguous() if pad_b or pad_r else out


class BiLevelRoutingAttentionNCHW(nn.Module):
    """Refactored BRA (ops/bra_nchw.py + ops/torch/rrsda.py) on NCHW input: 1x1-conv projections,
    region descriptors by average pooling, unscaled routing logits, token scale = dim^-0.5."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int):
        super().__init__()
        self.num_heads = num_heads
        self.n_win = n_win
        self.scale = dim ** -0.5
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.router = TopkRouting(topk, scale=None)
        self.kv_gather = KVGather()
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, 1)
        self.output_linear = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        n, _, hh, ww = x.shape
        s, m = self.n_win, self.num_heads
        h, w = hh // s, ww // s
        qkv = self.qkv_linear(x)  # (N, 3C, H, W): q | k | v
        q_img, k_img, v_img = qkv.chunk(3, dim=1)
        q_r = F.avg_pool2d(q_img, (h, w), ceil_mode=True, count_include_pad=False)
        k_r = F.avg_pool2d(k_img, (h, w), ceil_mode=True, count_include_pad=False)
        _, index = self.router(_permute(q_r, [0, 2, 3, 1]).flatten(1, 2), _permute(k_r.flatten(2, 3), [0, 2, 1]))
        q, k, v = _nhwc_to_heads(_permute(qkv, [0, 2, 3, 1]), s, 3, m).unbind(0)
        out = _routed_attention(q, k, v, index, self.scale, self.kv_gather)
        # contiguous NCHW, as the official output: the 1x1 conv then rounds exactly as the official one
        out = _permute(_heads_to_nhwc(out, n, s, h, w), [0, 3, 1, 2]).contiguous()
        return self.output_linear(out + self.lepe(v_img))


# ---------------------------------------------------------------------------------------------
# Global attention of the last stage
# ---------------------------------------------------------------------------------------------

class AttentionLePE(nn.Module):
    """Stage-4 attention of the NHWC models (models/_common.py): 8 heads, bias-free qkv,
    scale = head_dim^-0.5 applied after q @ k^T, LePE on the attention input x."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = _permute(qkv, [2, 0, 3, 1, 4]).unbind(0)
        lepe = _permute(self.lepe(_permute(x, [0, 2, 1]).reshape(b, c, h, w)), [0, 2, 3, 1]).reshape(b, h * w, c)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, h * w, c) + lepe
        return self.proj(out).reshape(b, h, w, c)


class AttentionLePENCHW(nn.Module):
    """Stage-4 attention of biformer_stl_nchw (nchwAttentionLePE): 1x1-conv qkv without bias,
    8 heads, softmax(q^T k * scale), LePE on v, 1x1-conv ``proj``."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        heads = (b, self.num_heads, self.head_dim, h * w)
        attn = q.reshape(heads).transpose(-1, -2) @ k.reshape(heads)
        attn = (attn * self.scale).softmax(dim=-1)
        out = attn @ v.reshape(heads).transpose(-1, -2)
        out = _permute(out, [0, 1, 3, 2]).reshape(b, c, h, w) + self.lepe(v)
        return self.proj(out)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's LayerNorm2d, eps 1e-6)."""

    def forward(self, x):
        x = F.layer_norm(_permute(x, [0, 2, 3, 1]), self.normalized_shape, self.weight, self.bias, self.eps)
        return _permute(x, [0, 3, 1, 2])


def _attention(cfg: BiFormerConfig, dim: int, topk: int, nchw: bool = False) -> nn.Module:
    if topk > 0:
        if nchw:
            return BiLevelRoutingAttentionNCHW(dim, dim // cfg.head_dim, cfg.n_win, topk, cfg.side_dwconv)
        return BiLevelRoutingAttention(dim, dim // cfg.head_dim, cfg.n_win, topk, cfg.side_dwconv, cfg.auto_pad)
    return (AttentionLePENCHW if nchw else AttentionLePE)(dim, cfg.global_heads, cfg.side_dwconv)


def _drop_path(rate: float) -> nn.Module:
    """As the official blocks: DropPath only where the rate is positive, else Identity."""
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class Block(nn.Module):
    """BiFormer block (models/biformer.py:54-132): depthwise-conv position embedding, then pre-norm
    attention and MLP on NHWC, each residual branch through drop path (the position embedding's
    is not), scaled by gamma1 / gamma2 when the config has layer scale.  ``mlp.1`` is the official
    Identity placeholder of the unused MLP DWConv, kept so the second Linear is ``mlp.3`` as in
    the checkpoints."""

    def __init__(self, cfg: BiFormerConfig, dim: int, topk: int, drop_path: float = 0.0):
        super().__init__()
        hidden = int(cfg.mlp_ratio * dim)
        k = cfg.pos_embed_kernel
        self.pos_embed = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = _attention(cfg, dim, topk)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = _drop_path(drop_path)
        self.use_layer_scale = cfg.layer_scale_init_value > 0
        if self.use_layer_scale:
            self.gamma1 = nn.Parameter(cfg.layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(cfg.layer_scale_init_value * torch.ones(dim))

    def forward(self, x):  # NCHW -> NCHW
        x = x + self.pos_embed(x)
        x = _permute(x, [0, 2, 3, 1])
        if self.use_layer_scale:
            x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
            x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return _permute(x, [0, 3, 1, 2])


class BiFormerBlock(nn.Module):
    """STL block: pre-norm attention and MLP, NHWC (LayerNorm, Linear MLP) or NCHW (LayerNorm2d,
    1x1-conv MLP, NCHW attention), both residual branches through drop path."""

    def __init__(self, cfg: BiFormerConfig, dim: int, topk: int, drop_path: float = 0.0):
        super().__init__()
        nchw = cfg.layout == "stl_nchw"
        hidden = int(cfg.mlp_ratio * dim)
        norm = LayerNorm2d if nchw else nn.LayerNorm
        self.norm1 = norm(dim, eps=cfg.norm_eps)
        self.attn = _attention(cfg, dim, topk, nchw)
        self.norm2 = norm(dim, eps=cfg.norm_eps)
        if nchw:
            self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = _drop_path(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """One STL stage: its blocks, run on NHWC (stl) or directly on NCHW (stl_nchw);
    ``drop_path``: the stage's slice of the model's schedule, one rate per block."""

    def __init__(self, cfg: BiFormerConfig, dim: int, depth: int, topk: int, drop_path=None):
        super().__init__()
        self.channels_last = cfg.layout == "stl"
        rates = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList([BiFormerBlock(cfg, dim, topk, rates[i]) for i in range(depth)])

    def forward(self, x):  # NCHW -> NCHW
        if self.channels_last:
            x = _permute(x, [0, 2, 3, 1])
        for blk in self.blocks:
            x = blk(x)
        return _permute(x, [0, 3, 1, 2]) if self.channels_last else x


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class _BiFormerBase(nn.Module):
    """What both model classes share: the input check, the feature loop and the hook lists."""

    # Sub-modules whose outputs are the per-stage features (NCHW).
    stage_names = ("stages.0", "stages.1", "stages.2", "stages.3")

    def __init__(self, cfg: BiFormerConfig, num_classes: int, drop_path_rate: float, drop_rate: float):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_features = cfg.embed_dim[-1]
        self.drop_path_rate = drop_path_rate
        self.drop_rate = drop_rate  # accepted as the official models accept it; they apply no dropout
        # the official per-block rates: linspace(0, drop_path_rate, total depth), split by stage
        # (computed on the CPU: plain floats, also when the model is built on the meta device)
        with torch.device("cpu"):
            self.block_drop_path = drop_path_schedule(drop_path_rate, cfg.depth)

    @property
    def routing_modules(self) -> tuple:
        """Paths of every TopkRouting sub-module; each one's forward returns (logits, index)."""
        return tuple(name for name, mod in self.named_modules() if isinstance(mod, TopkRouting))

    def _init_weights(self):
        """The official initialisation (``self.apply(self._init_weights)``, biformer.py:258-267,
        biformer_stl*.py): Linear trunc-normal(std 0.02, cut at +-2) with zero bias; LayerNorm
        (timm's LayerNorm2d too) weight 1 / bias 0.  Convs and BatchNorms keep torch's defaults
        (kaiming-uniform(a=sqrt(5)) weights and U(+-1/sqrt(fan_in)) biases; BN weight 1 / bias 0);
        layer scales keep their init value."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x):
        _check_input(self.cfg, x)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x)


class BiFormer(_BiFormerBase):
    """biformer_tiny / small / base."""

    def __init__(self, cfg: BiFormerConfig, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0):
        super().__init__(cfg, num_classes, drop_path_rate, drop_rate)
        dims = cfg.embed_dim
        stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(dims[i + 1]))
            for i in range(3)])
        self.stages = nn.ModuleList([
            nn.Sequential(*[Block(cfg, dims[i], cfg.topks[i], self.block_drop_path[i][j]) for j in range(cfg.depth[i])])
            for i in range(4)])
        self.norm = nn.BatchNorm2d(dims[-1])
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward(self, x):
        x = self.pre_logits(self.forward_features(x))
        return self.head(x.flatten(2).mean(-1))


class BiFormerSTL(_BiFormerBase):
    """biformer_stl / biformer_stl_nchw (Swin-Tiny layout ablations)."""

    def __init__(self, cfg: BiFormerConfig, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0):
        super().__init__(cfg, num_classes, drop_path_rate, drop_rate)
        dims = cfg.embed_dim
        stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), nn.BatchNorm2d(dims[0]))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(nn.BatchNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)) for i in range(3)])
        self.stages = nn.ModuleList([BasicLayer(cfg, dims[i], cfg.depth[i], cfg.topks[i], self.block_drop_path[i])
                                     for i in range(4)])
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward(self, x):
        return self.head(self.forward_features(x).mean([2, 3]))


class BiFormerDense(BiFormer):
    """The dense backbone ``BiFormer_mm`` (object_detection/ and semantic_segmentation/
    models_mm/biformer_mm.py:12-57): the BiFormer trunk (its config sets n_win and auto_pad)
    without the classifier's ``head`` and final BatchNorm ``norm``; every stage's output goes
    through its own side-branch ``extra_norms.{i}`` (timm LayerNorm2d, eps 1e-6, over channels,
    initialised weight 1 / bias 0) while the un-normalised map continues to the next stage.
    All four extra norms exist whatever ``out_indices`` selects, as in the official model.

    Training: ``norm_eval`` (the detection class's default True, biformer_mm.py:13, 59-67):
    ``train()`` leaves every BatchNorm in eval mode -- normalising with, and never updating, the
    running statistics; ``disable_bn_grad`` (detection, default False) freezes their affine
    weights too.  The segmentation class has neither (its factories refuse them) and converts its
    BatchNorms to SyncBatchNorm (same keys; on one process the same as BatchNorm2d).  Not
    reproduced: the detection class's ``train()`` returns None."""

    def __init__(self, cfg: BiFormerConfig, out_indices=(0, 1, 2, 3), in_chans: int = 3, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0, norm_eval: bool = False, disable_bn_grad: bool = False):
        super().__init__(cfg, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path_rate, drop_rate=drop_rate)
        del self.head, self.norm  # official step 1
        self.out_indices = tuple(out_indices)
        self.extra_norms = nn.ModuleList([LayerNorm2d(dim, eps=cfg.norm_eps) for dim in cfg.embed_dim])
        self.feature_info = [{"channels": cfg.embed_dim[i], "stride": 4 * 2 ** i} for i in self.out_indices]
        self._init_weights()  # official step 3: self.apply(self._init_weights) once more
        self.norm_eval = norm_eval
        if disable_bn_grad:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for param in m.parameters():
                        param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_features(self, x):
        _check_input(self.cfg, x)
        outs = []
        for i in range(max(self.out_indices) + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in self.out_indices:
                outs.append(self.extra_norms[i](x))
        return outs

    def forward(self, x):
        return self.forward_features(x)


DENSE_MODEL = BiFormerDense


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------

def _create(name: str, pretrained: bool, num_classes: int, kwargs: dict):
    """``kwargs``: in_chans, drop_path_rate, drop_rate (official defaults 3, 0., 0.); any other
    raises TypeError."""
    if pretrained:
        raise ValueError(f"{name}: this reference does not download weights; load an official checkpoint "
                         f"with model.load_state_dict(torch.load(path)['model'])")
    cfg = CONFIGS[name]
    model_cls = BiFormer if cfg.layout == "biformer" else BiFormerSTL
    return model_cls(cfg, num_classes=num_classes, **kwargs)


# One factory per variant, named as the official code names it.
@register_model
def biformer_tiny(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_tiny", pretrained, num_classes, kwargs)  # noqa: E501,E704
@register_model
def biformer_small(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_small", pretrained, num_classes, kwargs)  # noqa: E501,E704
@register_model
def biformer_base(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_base", pretrained, num_classes, kwargs)  # noqa: E501,E704
@register_model
def biformer_stl(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_stl", pretrained, num_classes, kwargs)  # noqa: E501,E704
@register_model
def biformer_stl_nchw(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_stl_nchw", pretrained, num_classes, kwargs)  # noqa: E501,E704


def _create_dense(name: str, pretrained: bool, kwargs: dict):
    """``kwargs``: out_indices, in_chans, drop_path_rate, drop_rate (+ norm_eval, disable_bn_grad
    for *_det); any other raises TypeError."""
    if pretrained:
        raise ValueError(f"{name}: this reference does not download weights; load the backbone keys of a "
                         f"detector / segmentor checkpoint with model.load_state_dict(...)")
    return BiFormerDense(DENSE_CONFIGS[name], **dense_factory_kwargs(name, kwargs))


# The dense backbones, BiFormer_mm as the COCO (n_win 16) and ADE20K (n_win 8) configs build it.
@register_model
def biformer_small_det(pretrained=False, **kwargs): return _create_dense("biformer_small_det", pretrained, kwargs)  # noqa: E501,E704
@register_model
def biformer_base_det(pretrained=False, **kwargs): return _create_dense("biformer_base_det", pretrained, kwargs)  # noqa: E501,E704
@register_model
def biformer_small_seg(pretrained=False, **kwargs): return _create_dense("biformer_small_seg", pretrained, kwargs)  # noqa: E501,E704
@register_model
def biformer_base_seg(pretrained=False, **kwargs): return _create_dense("biformer_base_seg", pretrained, kwargs)  # noqa: E501,E704
