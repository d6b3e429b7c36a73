"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023), Paddle port.

Reads side by side with ``reference_torch/biformer.py``: same classes, attribute names and order,
so parameter names are the official checkpoint's (BatchNorm running statistics aside: Paddle
calls them ``_mean`` / ``_variance``).  Variants: biformer_tiny, biformer_small, biformer_base,
biformer_stl, biformer_stl_nchw, and the dense backbones biformer_{small,base}_{det,seg}
(``BiFormer_mm``; any input size through the BRA's auto_pad).

Trains as the official code (and the reference) does: drop path on both residual branches of every
block at the official per-block rates, the official initialisation (``_init_weights``, torch's
conv init included), routing on detached region descriptors, every BatchNorm a
``numerics.BatchNorm2D`` (torch's momentum 0.1 and unbiased running-variance update, eps 1e-5),
and the detection backbones' frozen BatchNorm (``norm_eval``).  ``drop_rate`` is accepted and
unused, as in the official models, which have no dropout.

Bi-Level Routing Attention gathers the routed key/value regions with one gather over a
(batch x region) axis, so the gathered tensors hold topk regions per query region, never p^2.
Inside the BRA the layout work is arranged for Paddle (see the layout helpers) and so differs
from the reference, which keeps the official op order to match the official code bitwise; every
sub-module still takes and returns what its torch twin does.
"""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from model_configs.biformer import CONFIGS, DENSE_CONFIGS, BiFormerConfig, dense_factory_kwargs

from . import numerics
from . import layers, native
from .layers import DropPath, drop_path_schedule, permute, reshape
from .onednn import transpose_reshape

__all__ = ["BiFormer", "BiFormerSTL", "BiFormerDense", "biformer_tiny", "biformer_small", "biformer_base",
           "biformer_stl", "biformer_stl_nchw", "biformer_small_det", "biformer_base_det", "biformer_small_seg",
           "biformer_base_seg"]


# ---------------------------------------------------------------------------------------------
# Region/head layout helpers.  Regions are numbered row-major (region = row * n_win + col) and
# channels split head-major (channel = head * head_dim + j), as in the official code.  Attention
# runs on a heads-first layout (heads, batch * regions, tokens, head_dim) so that the routed
# gather lands directly in the layout the matmuls read.
#
# Permutations go through ``layers.permute`` (the dense transpose kernel), each of at most 6 dims,
# keeping the innermost run long (w * C, or head_dim) wherever the layout allows.
# ---------------------------------------------------------------------------------------------

def _nhwc_to_windows(x, n_win):
    """(N, H, W, C) -> (N, n_win^2, H/n_win, W/n_win, C)."""
    n, hh, ww, c = x.shape
    h, w = hh // n_win, ww // n_win
    return transpose_reshape(reshape(x, [n * n_win, h, n_win, w * c]), [0, 2, 1, 3], [n, n_win * n_win, h, w, c])


def _windows_to_heads(x, groups, num_heads):
    """(N, P, h, w, G * C) -> (G, heads, N * P, h * w, C / heads) for G stacked projections
    (G = 3 for a fused q | k | v)."""
    n, p, h, w, gc = x.shape
    d = gc // (groups * num_heads)
    return transpose_reshape(reshape(x, [n * p, h * w, groups * num_heads, d]), [2, 0, 1, 3],
                             [groups, num_heads, n * p, h * w, d])


def _nhwc_to_heads(x, n_win, groups, num_heads):
    """(N, H, W, G * C) -> (G, heads, N * P, h * w, C / heads): window partition and head split
    in one permutation."""
    n, hh, ww, gc = x.shape
    h, w = hh // n_win, ww // n_win
    d = gc // (groups * num_heads)
    return transpose_reshape(reshape(x, [n * n_win, h, n_win, w, groups * num_heads, d]), [4, 0, 2, 1, 3, 5],
                             [groups, num_heads, n * n_win * n_win, h * w, d])


def _heads_to_nhwc(x, n, n_win, h, w):
    """(heads, N * P, h * w, d) -> (N, n_win * h, n_win * w, heads * d)."""
    m, _, _, d = x.shape
    return transpose_reshape(reshape(x, [m, n * n_win, n_win, h, w, d]), [1, 3, 2, 4, 0, 5],
                             [n, n_win * h, n_win * w, m * d])


def _region_means(x, p):
    """(heads, N * P, tokens, d) -> (N, P, heads * d): the mean of each region's tokens."""
    m, n_p, _, d = x.shape
    return transpose_reshape(numerics.mean(x, axis=2), [1, 0, 2], [n_p // p, p, m * d])


@paddle.jit.not_to_static  # a shape check in plain Python; export traces the model without it
def _check_input(cfg: BiFormerConfig, x):
    problem = cfg.input_problem(x.shape[-2], x.shape[-1])
    if problem:
        raise ValueError(f"BiFormer: {problem}")


# ---------------------------------------------------------------------------------------------
# Linear and Conv2D with torch's bias-gradient accuracy.  A bias's gradient is a sum over every
# token (N x H x W rows: 6272 at stage 1 for a batch of 2 at 224); Paddle's float32 reduction is
# 5-15x less accurate than torch's (measured on biformer_tiny: stage-1/2 LePE, qkv, wo and MLP bias
# gradients 2e-4 to 8e-4 of their RMS off torch's, whose own float32 error is ~5e-5 of it).
# In training these layers add their bias with numerics.add_bias: the same float32 values, the
# bias gradient summed in float32 as accurately as torch's.  Eval runs Paddle's own layer.
# ---------------------------------------------------------------------------------------------

def _accurate_bias(layer, x) -> bool:
    return layer.training and layer.bias is not None and x.dtype == paddle.float32


class Linear(layers.Linear):
    """``layers.Linear`` (same parameters, keys and eval forward as ``nn.Linear``); training:
    numerics.add_bias."""

    def forward(self, x):
        if not _accurate_bias(self, x):
            return layers.Linear.forward(self, x)  # not super(): dy2static rewrites this method
        return numerics.add_bias(F.linear(x, self.weight), self.bias)


class Conv2D(layers.Conv2D):
    """``layers.Conv2D`` (same parameters, keys and eval forward as ``nn.Conv2D``, NCHW); training:
    numerics.add_bias.  The 5x5 LePE never takes the FFT, though it would be 1.2-2x faster than
    Paddle's conv (``depthwise.fft_applies``): the FFT's rounding, even over each map, moved
    biformer_small_det's features 5-14% further from the float64 reference on 5 of its 8 maps.  The
    compiled kernel (``native.py``, a direct sum, 5x faster again) takes it where nothing is recorded."""

    def forward(self, x):
        if not _accurate_bias(self, x):
            return layers.Conv2D.forward(self, x)  # not super(): dy2static rewrites this method
        y = F.conv2d(x, self.weight, None, stride=self._stride, padding=self._padding, dilation=self._dilation,
                     groups=self._groups, data_format=self._data_format)
        return numerics.add_bias(y, self.bias, channel_axis=1)


# ---------------------------------------------------------------------------------------------
# Bi-Level Routing Attention
# ---------------------------------------------------------------------------------------------

class TopkRouting(nn.Layer):
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
        logits = paddle.matmul(query, key, transpose_y=True)
        index = paddle.topk(logits, k=self.topk, axis=-1)[1]
        return logits, index


class KVGather(nn.Layer):
    """Gather the routed regions' keys and values for every query region.

    k, v: (heads, N * P, tokens, d); index: (N, P, topk).  Returns k, v of shape
    (heads, N * P, topk * tokens, d).  One gather over the (batch x region) axis: only the
    topk selected regions are copied, nothing is expanded to P regions per query region.
    """

    def forward(self, index, k, v):
        n, p, topk = index.shape
        offsets = paddle.arange(n, dtype=index.dtype).reshape([n, 1, 1]) * p
        flat = (index + offsets).reshape([-1])

        def take(t):
            m, _, tokens, d = t.shape
            # gather, not index_select: the same rows and gradients, bit for bit, and Paddle's CPU
            # gather kernel is faster (biformer_small's dygraph forward at batch 8: -6%); where nothing
            # is recorded, the compiled kernel's copies (Paddle's gather runs one thread)
            picked = (native.native_gather_blocks(t, flat) if native.runs_natively(t)
                      else paddle.gather(t, flat, axis=1))
            return reshape(picked, [m, n * p, topk * tokens, d])

        return take(k), take(v)


def _routed_attention(q, k, v, index, scale, kv_gather):
    """Token-to-token attention of each query region over its routed regions (heads-first)."""
    k, v = kv_gather(index, k, v)
    attn = paddle.matmul(q * scale, k, transpose_y=True)
    return paddle.matmul(layers.softmax(attn), v)


class QKVLinear(nn.Layer):
    """One Linear producing q (qk_dim), k (qk_dim) and v (dim) channels, concatenated."""

    def __init__(self, dim: int, qk_dim: int):
        super().__init__()
        self.qkv = Linear(dim, 2 * qk_dim + dim)

    def forward(self, x):
        return self.qkv(x)


class BiLevelRoutingAttention(nn.Layer):
    """Legacy BRA (ops/bra_legacy.py) on NHWC input, as every released NHWC model uses it:
    identity kv downsampling, hard non-differentiable routing, scale = qk_dim^-0.5 for both the
    routing and the token attention, LePE on v, output Linear ``wo``.

    ``auto_pad`` (the dense backbones, bra_legacy.py:212-225 and 276-279): the input is
    zero-padded bottom/right to a multiple of n_win and everything above runs on the padded map
    without a mask (padded tokens are Linear(0) = the qkv bias: they shape the region means,
    are routed to, attended to, and feed the LePE conv at the border); the output is cropped.
    Windows made only of padding hold identical keys and values, so their exact ties in the
    top-k routing cannot change the output, although Paddle's top-k breaks such ties
    differently from torch's."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int,
                 auto_pad: bool = False):
        super().__init__()
        self.qk_dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.scale = self.qk_dim ** -0.5
        self.lepe = Conv2D(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.router = TopkRouting(topk, scale=self.scale)
        self.kv_gather = KVGather()
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = Linear(dim, dim)
        self.auto_pad = auto_pad

    def forward(self, x):
        n, h_in, w_in, _ = x.shape
        s, m = self.n_win, self.num_heads
        pad_b, pad_r = ((-h_in) % s, (-w_in) % s) if self.auto_pad else (0, 0)
        if pad_b or pad_r:
            x = F.pad(x, [0, pad_r, 0, pad_b], data_format="NHWC")  # zeros at the right and bottom
        h, w = (h_in + pad_b) // s, (w_in + pad_r) // s
        qkv = self.qkv(_nhwc_to_windows(x, s))  # (N, P, h, w, 3C): q | k | v
        q, k, v = paddle.unbind(_windows_to_heads(qkv, 3, m), axis=0)  # each (heads, N * P, h * w, d)
        _, index = self.router(_region_means(q, s * s), _region_means(k, s * s))
        lepe = self.lepe(permute(_heads_to_nhwc(v, n, s, h, w), [0, 3, 1, 2]))
        out = _routed_attention(q, k, v, index, self.scale, self.kv_gather)
        out = self.wo(_heads_to_nhwc(out, n, s, h, w) + permute(lepe, [0, 2, 3, 1]))
        return out[:, :h_in, :w_in] if pad_b or pad_r else out


class BiLevelRoutingAttentionNCHW(nn.Layer):
    """Refactored BRA (ops/bra_nchw.py + ops/torch/rrsda.py) on NCHW input: 1x1-conv projections,
    region descriptors by average pooling, unscaled routing logits, token scale = dim^-0.5."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int):
        super().__init__()
        self.num_heads = num_heads
        self.n_win = n_win
        self.scale = dim ** -0.5
        self.lepe = Conv2D(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.router = TopkRouting(topk, scale=None)
        self.kv_gather = KVGather()
        self.qkv_linear = Conv2D(dim, 3 * dim, 1)
        self.output_linear = Conv2D(dim, dim, 1)

    def forward(self, x):
        n, c, hh, ww = x.shape
        s, m = self.n_win, self.num_heads
        h, w = hh // s, ww // s
        qkv = self.qkv_linear(x)  # (N, 3C, H, W): q | k | v
        qkv_nhwc = transpose_reshape(qkv, [0, 2, 3, 1], [n, hh, ww, 3 * c])  # a reshape follows (onednn.py)
        q, k, v = paddle.unbind(_nhwc_to_heads(qkv_nhwc, s, 3, m), axis=0)
        _, index = self.router(_region_means(q, s * s), _region_means(k, s * s))
        out = _routed_attention(q, k, v, index, self.scale, self.kv_gather)
        out = permute(_heads_to_nhwc(out, n, s, h, w), [0, 3, 1, 2])
        return self.output_linear(out + self.lepe(qkv[:, 2 * c:]))


# ---------------------------------------------------------------------------------------------
# Global attention of the last stage
# ---------------------------------------------------------------------------------------------

class AttentionLePE(nn.Layer):
    """Stage-4 attention of the NHWC models (models/_common.py): 8 heads, bias-free qkv,
    scale = head_dim^-0.5 applied after q @ k^T, LePE on the attention input x."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, dim * 3, bias_attr=False)
        self.proj = Linear(dim, dim)
        self.lepe = Conv2D(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x):
        b, h, w, c = x.shape
        x = reshape(x, [b, h * w, c])
        q, k, v = layers.qkv_heads(self.qkv, x, self.num_heads)
        lepe = transpose_reshape(self.lepe(transpose_reshape(x, [0, 2, 1], [b, c, h, w])), [0, 2, 3, 1], [b, h * w, c])
        attn = layers.softmax(paddle.matmul(q, k, transpose_y=True) * self.scale)
        out = transpose_reshape(paddle.matmul(attn, v), [0, 2, 1, 3], [b, h * w, c]) + lepe
        return reshape(self.proj(out), [b, h, w, c])


class AttentionLePENCHW(nn.Layer):
    """Stage-4 attention of biformer_stl_nchw (nchwAttentionLePE): 1x1-conv qkv without bias,
    8 heads, softmax(q^T k * scale), LePE on v, 1x1-conv ``proj``."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Conv2D(dim, dim * 3, 1, bias_attr=False)
        self.proj = Conv2D(dim, dim, 1)
        self.lepe = Conv2D(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = paddle.chunk(self.qkv(x), 3, axis=1)
        heads = layers.constant_shape([b, self.num_heads, self.head_dim, h * w])
        attn = paddle.matmul(q.reshape(heads), k.reshape(heads), transpose_x=True)
        attn = layers.softmax(attn * self.scale)
        out = paddle.matmul(attn, v.reshape(heads), transpose_y=True)
        out = transpose_reshape(out, [0, 1, 3, 2], [b, c, h, w]) + self.lepe(v)
        return self.proj(out)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, keys and eval forward); training: numerics.layer_norm.  Its
    backward subtracts two nearly equal terms per token, and Paddle's float32 kernel rounds them ~3-7x
    worse than torch's: the dense backbones' loss gradient, which reaches the trunk only through the
    extra_norms' backward, carried that into every stage-3/4 gradient."""

    def _layer_norm(self, x):
        if not (self.training and x.dtype == paddle.float32):
            return F.layer_norm(x, self._normalized_shape, self.weight, self.bias, self._epsilon)
        return numerics.layer_norm(x, self.weight, self.bias, self._epsilon)

    def forward(self, x):
        return self._layer_norm(x)


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's LayerNorm2d, eps 1e-6)."""

    def forward(self, x):
        return permute(self._layer_norm(permute(x, [0, 2, 3, 1])), [0, 3, 1, 2])


def _attention(cfg: BiFormerConfig, dim: int, topk: int, nchw: bool = False) -> nn.Layer:
    if topk > 0:
        if nchw:
            return BiLevelRoutingAttentionNCHW(dim, dim // cfg.head_dim, cfg.n_win, topk, cfg.side_dwconv)
        return BiLevelRoutingAttention(dim, dim // cfg.head_dim, cfg.n_win, topk, cfg.side_dwconv, cfg.auto_pad)
    return (AttentionLePENCHW if nchw else AttentionLePE)(dim, cfg.global_heads, cfg.side_dwconv)


def _drop_path(rate: float) -> nn.Layer:
    """As the official blocks: DropPath only where the rate is positive, else Identity."""
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class Block(nn.Layer):
    """BiFormer block (models/biformer.py:54-132): depthwise-conv position embedding, then pre-norm
    attention and MLP on NHWC, each residual branch through drop path (the position embedding's
    is not), scaled by gamma1 / gamma2 when the config has layer scale.  ``mlp.1`` is the official
    Identity placeholder of the unused MLP DWConv, kept so the second Linear is ``mlp.3`` as in
    the checkpoints."""

    def __init__(self, cfg: BiFormerConfig, dim: int, topk: int, drop_path: float = 0.0):
        super().__init__()
        hidden = int(cfg.mlp_ratio * dim)
        k = cfg.pos_embed_kernel
        self.pos_embed = Conv2D(dim, dim, k, padding=k // 2, groups=dim)
        self.norm1 = LayerNorm(dim, epsilon=cfg.norm_eps)
        self.attn = _attention(cfg, dim, topk)
        self.norm2 = LayerNorm(dim, epsilon=cfg.norm_eps)
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.Identity(), layers.GELU(in_place=True), Linear(hidden, dim))
        self.drop_path = _drop_path(drop_path)
        self.use_layer_scale = cfg.layer_scale_init_value > 0
        if self.use_layer_scale:
            init = nn.initializer.Constant(cfg.layer_scale_init_value)
            self.gamma1 = self.create_parameter([dim], default_initializer=init)
            self.gamma2 = self.create_parameter([dim], default_initializer=init)

    def forward(self, x):  # NCHW -> NCHW
        x = x + self.pos_embed(x)
        x = permute(x, [0, 2, 3, 1])
        if self.use_layer_scale:
            x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
            x = x + self.drop_path(self.gamma2 * layers.token_rows(self.mlp, self.norm2(x)))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(layers.token_rows(self.mlp, self.norm2(x)))
        return permute(x, [0, 3, 1, 2])


class BiFormerBlock(nn.Layer):
    """STL block: pre-norm attention and MLP, NHWC (LayerNorm, Linear MLP) or NCHW (LayerNorm2d,
    1x1-conv MLP, NCHW attention), both residual branches through drop path."""

    def __init__(self, cfg: BiFormerConfig, dim: int, topk: int, drop_path: float = 0.0):
        super().__init__()
        nchw = cfg.layout == "stl_nchw"
        hidden = int(cfg.mlp_ratio * dim)
        norm = LayerNorm2d if nchw else LayerNorm
        self.norm1 = norm(dim, epsilon=cfg.norm_eps)
        self.attn = _attention(cfg, dim, topk, nchw)
        self.norm2 = norm(dim, epsilon=cfg.norm_eps)
        self.channels_last = not nchw
        if nchw:
            self.mlp = nn.Sequential(Conv2D(dim, hidden, 1), layers.GELU(in_place=True), Conv2D(hidden, dim, 1))
        else:
            self.mlp = nn.Sequential(Linear(dim, hidden), layers.GELU(in_place=True), Linear(hidden, dim))
        self.drop_path = _drop_path(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        y = self.norm2(x)
        return x + self.drop_path(layers.token_rows(self.mlp, y) if self.channels_last else self.mlp(y))


class BasicLayer(nn.Layer):
    """One STL stage: its blocks, run on NHWC (stl) or directly on NCHW (stl_nchw);
    ``drop_path``: the stage's slice of the model's schedule, one rate per block."""

    def __init__(self, cfg: BiFormerConfig, dim: int, depth: int, topk: int, drop_path=None):
        super().__init__()
        self.channels_last = cfg.layout == "stl"
        rates = drop_path or [0.0] * depth
        self.blocks = nn.LayerList([BiFormerBlock(cfg, dim, topk, rates[i]) for i in range(depth)])

    def forward(self, x):  # NCHW -> NCHW
        if self.channels_last:
            x = permute(x, [0, 2, 3, 1])
        for blk in self.blocks:
            x = blk(x)
        return permute(x, [0, 3, 1, 2]) if self.channels_last else x


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

_ZEROS = nn.initializer.Constant(0.0)
_ONES = nn.initializer.Constant(1.0)


def _trunc_normal_(param, std: float = 0.02, a: float = -2.0, b: float = 2.0):
    """torch's ``trunc_normal_(param, std=std)`` (absolute cut at [a, b]), by torch's own method:
    inverse-CDF of a uniform draw on the truncated range, on Paddle's seeded generator.  Same
    distribution as ``nn.initializer.TruncatedNormal(0, std, a, b)``, which is ~1.6x slower on CPU."""
    def norm_cdf(v):
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    low, high = norm_cdf(a / std), norm_cdf(b / std)
    u = paddle.uniform(param.shape, dtype=param.dtype, min=2 * low - 1, max=2 * high - 1)
    param.set_value(paddle.clip(paddle.erfinv(u) * (std * math.sqrt(2.0)), a, b))


def _batch_norm(channels: int) -> nn.Layer:
    """torch's nn.BatchNorm2d(channels) with its defaults (momentum 0.1, eps 1e-5), trained as torch
    trains it (numerics.BatchNorm2D: unbiased running-variance update)."""
    return numerics.BatchNorm2D(channels, momentum=0.1, epsilon=1e-5)


class _BiFormerBase(nn.Layer):
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
        self.block_drop_path = drop_path_schedule(drop_path_rate, cfg.depth)

    @property
    def routing_modules(self) -> tuple:
        """Paths of every TopkRouting sub-module; each one's forward returns (logits, index)."""
        return tuple(name for name, mod in self.named_sublayers() if isinstance(mod, TopkRouting))

    def _init_weights(self):
        """The official initialisation (``self.apply(self._init_weights)``, biformer.py:258-267,
        biformer_stl*.py): Linear trunc-normal(std 0.02, cut at +-2, as torch's trunc_normal_) with
        zero bias; LayerNorm (LayerNorm2d too) weight 1 / bias 0.  The official convs keep torch's
        default init, which Paddle's is not (normal weights, zero bias): kaiming-uniform(a=sqrt(5))
        = U(+-1/sqrt(fan_in)) weights and U(+-1/sqrt(fan_in)) biases, set here.  BatchNorm weight 1
        / bias 0 and layer scales at their init value are both frameworks' construction already."""
        for m in self.sublayers():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    _ZEROS(m.bias)
            elif isinstance(m, nn.LayerNorm):
                _ZEROS(m.bias)
                _ONES(m.weight)
            elif isinstance(m, nn.Conv2D):
                _, in_per_group, kh, kw = m.weight.shape
                bound = 1.0 / math.sqrt(in_per_group * kh * kw)
                nn.initializer.Uniform(-bound, bound)(m.weight)
                if m.bias is not None:
                    nn.initializer.Uniform(-bound, bound)(m.bias)

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
            Conv2D(in_chans, dims[0] // 2, 3, stride=2, padding=1),
            _batch_norm(dims[0] // 2),
            layers.GELU(in_place=True),
            Conv2D(dims[0] // 2, dims[0], 3, stride=2, padding=1),
            _batch_norm(dims[0]),
        )
        self.downsample_layers = nn.LayerList([stem] + [
            nn.Sequential(Conv2D(dims[i], dims[i + 1], 3, stride=2, padding=1), _batch_norm(dims[i + 1]))
            for i in range(3)])
        self.stages = nn.LayerList([
            nn.Sequential(*[Block(cfg, dims[i], cfg.topks[i], self.block_drop_path[i][j]) for j in range(cfg.depth[i])])
            for i in range(4)])
        self.norm = _batch_norm(dims[-1])
        self.pre_logits = nn.Identity()
        self.head = Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward(self, x):
        x = self.pre_logits(self.forward_features(x))
        return self.head(numerics.mean(x.flatten(2), axis=-1))


class BiFormerSTL(_BiFormerBase):
    """biformer_stl / biformer_stl_nchw (Swin-Tiny layout ablations)."""

    def __init__(self, cfg: BiFormerConfig, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0):
        super().__init__(cfg, num_classes, drop_path_rate, drop_rate)
        dims = cfg.embed_dim
        stem = nn.Sequential(Conv2D(in_chans, dims[0], 4, stride=4), _batch_norm(dims[0]))
        self.downsample_layers = nn.LayerList([stem] + [
            nn.Sequential(_batch_norm(dims[i]), Conv2D(dims[i], dims[i + 1], 2, stride=2)) for i in range(3)])
        self.stages = nn.LayerList([BasicLayer(cfg, dims[i], cfg.depth[i], cfg.topks[i], self.block_drop_path[i])
                                    for i in range(4)])
        self.norm = _batch_norm(dims[-1])
        self.head = Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward(self, x):
        return self.head(numerics.mean(self.forward_features(x), axis=[2, 3]))


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
        self.extra_norms = nn.LayerList([LayerNorm2d(dim, epsilon=cfg.norm_eps) for dim in cfg.embed_dim])
        self.feature_info = [{"channels": cfg.embed_dim[i], "stride": 4 * 2 ** i} for i in self.out_indices]
        self._init_weights()  # official step 3: self.apply(self._init_weights) once more
        self.norm_eval = norm_eval
        if disable_bn_grad:
            for m in self.sublayers():
                if isinstance(m, nn.BatchNorm2D):
                    for param in (m.weight, m.bias):
                        param.stop_gradient = True

    def train(self, mode: bool = True):
        if not mode:
            return self.eval()
        super().train()
        if self.norm_eval:
            for m in self.sublayers():
                if isinstance(m, nn.BatchNorm2D):
                    m.training = False  # the layer only (Layer.eval() would switch Paddle's global tracer too)
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
        raise ValueError(f"{name}: no bundled weights; convert an official checkpoint with torch2paddle "
                         f"and load it with model.set_state_dict(paddle.load(path))")
    cfg = CONFIGS[name]
    model_cls = BiFormer if cfg.layout == "biformer" else BiFormerSTL
    return model_cls(cfg, num_classes=num_classes, **kwargs)


# One factory per variant, named as the official code names it.
def biformer_tiny(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_tiny", pretrained, num_classes, kwargs)  # noqa: E501,E704
def biformer_small(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_small", pretrained, num_classes, kwargs)  # noqa: E501,E704
def biformer_base(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_base", pretrained, num_classes, kwargs)  # noqa: E501,E704
def biformer_stl(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_stl", pretrained, num_classes, kwargs)  # noqa: E501,E704
def biformer_stl_nchw(pretrained=False, num_classes=1000, **kwargs): return _create("biformer_stl_nchw", pretrained, num_classes, kwargs)  # noqa: E501,E704


def _create_dense(name: str, pretrained: bool, kwargs: dict):
    """``kwargs``: out_indices, in_chans, drop_path_rate, drop_rate (+ norm_eval, disable_bn_grad
    for *_det); any other raises TypeError."""
    if pretrained:
        raise ValueError(f"{name}: no bundled weights; convert the backbone of a detector / segmentor checkpoint "
                         f"with torch2paddle and load it with model.set_state_dict(paddle.load(path))")
    return BiFormerDense(DENSE_CONFIGS[name], **dense_factory_kwargs(name, kwargs))


# The dense backbones, BiFormer_mm as the COCO (n_win 16) and ADE20K (n_win 8) configs build it.
def biformer_small_det(pretrained=False, **kwargs): return _create_dense("biformer_small_det", pretrained, kwargs)  # noqa: E501,E704
def biformer_base_det(pretrained=False, **kwargs): return _create_dense("biformer_base_det", pretrained, kwargs)  # noqa: E501,E704
def biformer_small_seg(pretrained=False, **kwargs): return _create_dense("biformer_small_seg", pretrained, kwargs)  # noqa: E501,E704
def biformer_base_seg(pretrained=False, **kwargs): return _create_dense("biformer_base_seg", pretrained, kwargs)  # noqa: E501,E704
