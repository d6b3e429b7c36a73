"""Layers every family's Paddle port shares; side by side with ``reference_torch/layers.py``."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn

from . import native


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """Stochastic depth: each sample's residual branch is kept with probability 1 - p and the kept
    ones are scaled by 1 / (1 - p); identity in eval or at rate 0."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = paddle.bernoulli(paddle.full([x.shape[0]] + [1] * (x.ndim - 1), keep, dtype=x.dtype))
    return x * (mask / keep)


class DropPath(nn.Layer):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


def drop_path_schedule(drop_path_rate: float, depths) -> list:
    """The official per-block rates: linspace(0, rate, total depth), split by stage (the same
    float32 values torch.linspace gives)."""
    rates = np.linspace(0, drop_path_rate, sum(depths), dtype=np.float32).tolist()
    out, start = [], 0
    for depth in depths:
        out.append(rates[start:start + depth])
        start += depth
    return out


def permute(x, perm):
    """``x.transpose(perm)``, materialised through the dense transpose kernel (len(perm) <= 6).
    Paddle 3.3's CPU ``transpose`` returns a strided view that the next reshape, flatten or matmul
    copies through a slow generic strided copy (~20x slower than torch's: on regionvit_small at
    batch 8 its flattens took 250 ms of 3.2 s); einsum's permutation writes the result densely.
    A traced graph keeps ``transpose``: oneDNN's is dense (and einsum runs outside oneDNN).  Where
    nothing is recorded, on CPU, a permutation that keeps the last axis (attention's head splits and
    merges, window partitions) runs the compiled kernel, one copy per row on every thread (einsum's
    runs one: [512, 49, 3, 3, 32] -> [3, 512, 3, 49, 32] at two threads 12.2 ms, torch 2.1)."""
    if not paddle.in_dynamic_mode():
        return x.transpose(perm)
    if perm[-1] == len(perm) - 1 and native.runs_natively(x):
        return native.native_permute(x, perm)
    src = "abcdef"[:len(perm)]
    return paddle.einsum(f"{src}->{''.join(src[i] for i in perm)}", x)


@paddle.jit.not_to_static  # plain Python over the traced shape list
def constant_shape(shape):
    """A reshape target with its one size known only at run time (a traced dynamic batch, or a size
    computed from it) as -1, so the traced graph holds it as a constant instead of building it per
    forward (shape, slice, stack ops: 360 stacks of biformer_small's 5700 exported ops; batch 1,
    fused-only: 177 -> 170 ms).  Dygraph's int shapes, and targets that already hold -1, unchanged."""
    sizes = list(shape)
    unknown = [i for i, size in enumerate(sizes) if not isinstance(size, int)]
    if len(unknown) == 1 and -1 not in sizes[:unknown[0]] + sizes[unknown[0] + 1:]:
        sizes[unknown[0]] = -1
    return sizes


def reshape(x, shape):
    """``x.reshape(shape)``, the target a constant where ``constant_shape`` can make it one."""
    return x.reshape(constant_shape(shape))


def token_rows(fn, x):
    """``fn(x)`` for a token-wise ``fn`` (an MLP: Linear, GELU, Linear) on an NHWC map ``x``.  A traced
    graph runs it on the rows [B, H * W, C] and reshapes the result back: Paddle Inference moves a
    Linear onto oneDNN's fc, which takes the GELU after it into its epilogue, only for an input of
    at most 3 dims (a 4-D one must be [B, C, 1, 1]); on 4-D the Linears stay on Paddle's fc and the
    GELU is a pass of its own (biformer_small, fused-only, batch 8 / 1: 1249 / 183 -> 1142 / 177 ms)."""
    if paddle.in_dynamic_mode() or x.ndim != 4 or not all(isinstance(n, int) and n > 0 for n in x.shape[1:]):
        return fn(x)  # (a map of run-time size too: reshaping back would need its sizes)
    _, H, W, C = x.shape
    y = fn(x.reshape([0, -1, C]))
    return y.reshape([0, H, W, y.shape[-1]])


def qkv_heads(qkv, x, num_heads: int):
    """q, k, v of the tokens ``x`` [B, N, C] by the fused projection ``qkv`` (a Linear to 3C, its
    output channels q | k | v, each head's d = C / heads contiguous): three [B, heads, N, d].

    Dygraph: one projection, one dense permutation, unbind (whose backward is one concat; indexing
    the three would scatter three full-size gradients).  A traced graph projects by the weight's
    three column blocks instead: the same products, bit for bit (Paddle Inference folds the slices
    into constants), and each reshape + transpose then feeds oneDNN's matmul, which reads it in
    place, where the 5-D permutation and the split are two copies (Paddle Inference, fused-only /
    oneDNN on: crossformer_small batch 8 731 / 687 -> 665 / 625 ms, batch 1 98.5 / 106 -> 93.7 / 98;
    regionvit_small batch 8 796 / 791 -> 767 / 706; BiFormer's stage-4 attention: unchanged).  Not
    BiFormer's routed attention: its three projections of 5-D windows came out 2-4% slower than one."""
    B, N, C = x.shape
    d = C // num_heads
    if paddle.in_dynamic_mode():
        return paddle.unbind(permute(qkv(x).reshape([B, N, 3, num_heads, d]), [2, 0, 3, 1, 4]), axis=0)
    w, b = qkv.weight, qkv.bias
    return [nn.functional.linear(x, w[:, i * C:(i + 1) * C], None if b is None else b[i * C:(i + 1) * C])
            .reshape([-1, N, num_heads, d]).transpose([0, 2, 1, 3]) for i in range(3)]


def conv_may_take_eager_route(layer, x) -> bool:
    """Whether a call of the ``nn.Conv2D`` ``layer`` on ``x`` may be computed another way than by
    Paddle's conv (``depthwise.fft_applies``, ``patch_conv.patch_conv_applies`` add their own
    conditions): a float32 dygraph call recording no gradient (training keeps Paddle's kernel), no
    dilation, equal explicit zero padding, NCHW."""
    return (paddle.in_dynamic_mode() and x.dtype == paddle.float32
            and not native.records_gradient(x, *layer.parameters(include_sublayers=False))
            and list(layer._dilation) == [1, 1] and layer._padding_algorithm == "EXPLICIT"
            and len(set(layer._updated_padding)) == 1 and layer._padding_mode == "zeros"
            and layer._data_format == "NCHW")


def is_same_depthwise(layer) -> bool:
    """Whether the ``nn.Conv2D`` ``layer`` is a depthwise conv (one filter per channel) with an odd
    square kernel, stride 1 and 'same' padding k // 2: the conv the FFT route and the compiled kernel
    compute (``depthwise.fft_applies``, ``native_depthwise_applies``)."""
    k = layer.weight.shape[-1]
    return (layer._groups == layer._in_channels == layer._out_channels and layer.weight.shape[-2] == k
            and k % 2 == 1 and list(layer._stride) == [1, 1] and layer._updated_padding[0] == k // 2)


def native_depthwise_applies(layer, x) -> bool:
    """Whether a call of ``layer`` (an ``nn.Conv2D``) on ``x`` runs the compiled depthwise kernel
    (``native.native_depthwise_conv2d``): ``conv_may_take_eager_route`` (float32 dygraph, nothing
    recorded), ``is_same_depthwise``, a CPU tensor, the kernels built."""
    return (conv_may_take_eager_route(layer, x) and is_same_depthwise(layer) and x.place.is_cpu_place()
            and native.native_kernels_available())


def add_into(fresh, other):
    """``fresh + other``, written into ``fresh`` in dygraph.  ``fresh`` must be an intermediate that
    nothing else holds and that no backward reads (a matmul's or conv's output).  Why: on CPU a fresh
    large tensor pays its page faults again (on [8, 512, 56, 56]: 30 ms into a new tensor, 10 ms in
    place).  A traced graph keeps the plain add, which Paddle Inference fuses."""
    if not paddle.in_dynamic_mode():
        return fresh + other
    return fresh.add_(other)


def dense_operand(small, like):
    """``small`` expanded to ``like``'s shape, for an elementwise op with ``like``.  Paddle 3.3's CPU
    broadcast kernel takes a slow path when the broadcast axis is not trailing ([8, 96, 56, 56] minus
    [8, 1, 56, 56]: 40 ms, minus the expanded operand 14 ms, the same values).  A traced graph expands
    too: oneDNN's broadcast is fast, but Paddle Inference with oneDNN for its fused ops only runs
    Paddle's (regionvit_small's LayerNorm2d: batch 1 / 8 fused-only 129.2 / 868 -> 125.9 / 852 ms,
    oneDNN off 1138 -> 1092 at batch 8, oneDNN on unchanged).  For add, subtract and multiply only:
    Paddle's same-shape divide is not correctly rounded."""
    return small.expand_as(like)


def softmax(x):
    """``F.softmax(x, axis=-1)``, attention's weights.  Where nothing is recorded, on a float32 CPU
    tensor, by the compiled kernel (``native.native_softmax``): its rows split among Paddle's threads
    where Paddle's softmax runs one, and each output rounded once from double-precision exponentials,
    sum and quotient (off float64 by 6e-8 relative at most; Paddle's and torch's kernels 1-2e-6).  On
    crossformer_small's [512, 3, 49, 49] at one / two threads: 9.2 / 4.3 ms, Paddle's 12.8 / 11.4."""
    if native.runs_natively(x):
        return native.native_softmax(x)
    return nn.functional.softmax(x, axis=-1)


class GELU(nn.GELU):
    """``nn.GELU()`` (exact) whose dygraph forward, when no gradient is recorded, on a float32 CPU
    tensor, runs the compiled kernel (``native.native_gelu``, on [8, 256, 56, 56] ~0.7x Paddle's time
    and ~4x torch's, and closer to float64 than either); Paddle's otherwise and in a traced graph.
    ``in_place=True`` (where the input is always the fresh output of the layer before, a conv, Linear
    or norm that nothing else reads, as ``add_into`` asks): the kernel writes into it, sparing a new
    map's page faults (dygraph at batch 8, one thread: fcvit_b12 and crossformer_small -6%)."""

    def __init__(self, approximate: bool = False, in_place: bool = False):
        super().__init__(approximate=approximate)
        self.in_place = in_place

    def forward(self, x):
        if not self._approximate and native.runs_natively(x):
            return native.native_gelu(x, in_place=self.in_place)
        return nn.GELU.forward(self, x)  # not super(): dy2static rewrites this method


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and results, bit for bit) whose dygraph forward
    adds the bias in place on the product (``add_into``): on [8, 3136, 96] x [96, 384] the product
    takes 34 ms, ``F.linear`` 58 ms, the product plus the in-place add 43 ms; where nothing is
    recorded, on CPU, by the compiled kernel (``native.native_add_row_bias``: on [8, 3136, 384]
    10.5 -> 1.4 ms, one thread).  A static graph (export) keeps ``nn.Linear``'s forward, the
    matmul + add that Paddle Inference fuses into ``fc``."""

    def forward(self, x):
        if self.bias is None or not paddle.in_dynamic_mode():
            return nn.Linear.forward(self, x)  # not super(): dy2static rewrites this method
        out = paddle.matmul(x, self.weight)
        if native.runs_natively(out, self.weight, self.bias):  # the same sums, one compiled pass
            return native.native_add_row_bias(out, self.bias)
        return add_into(out, self.bias)


class Conv2D(nn.Conv2D):
    """``nn.Conv2D`` (same parameters, state-dict keys and results, bit for bit) whose dygraph forward
    adds the bias as a [C, 1, 1] tensor, in place (where nothing is recorded, by the compiled kernel:
    ``native.native_add_channel_bias``, 3-5x faster).  Paddle 3.3's ``F.conv2d`` adds it reshaped to
    [1, C, 1, 1], and its CPU broadcast kernel takes a slow path for a leading broadcast axis: on
    [8, 32, 56, 56] -> 128 channels, a 1x1 conv with bias took 110 ms, the conv alone 16 ms, the conv
    plus a [C, 1, 1] bias 34 ms; in place (``add_into``).  A depthwise conv runs the compiled kernel
    where ``native_depthwise_applies`` (Paddle's: 3x3 on [8, 2048, 7, 7] 22 ms, the kernel 2.6).
    In a static graph (export) it is ``nn.Conv2D``'s forward, so Paddle Inference's
    conv + bias fusions see the graph they expect."""

    def forward(self, x):
        if native_depthwise_applies(self, x):
            return native.native_depthwise_conv2d(x, self.weight, self.bias)
        if (self.bias is None or not paddle.in_dynamic_mode() or self._data_format != "NCHW"
                or self._padding_mode != "zeros"):
            return nn.Conv2D.forward(self, x)  # not super(): dy2static rewrites this method
        out = nn.functional.conv._conv_nd(  # what nn.Conv2D.forward runs, less the bias
            x, self.weight, bias=None, stride=self._stride, padding=self._updated_padding,
            padding_algorithm=self._padding_algorithm, dilation=self._dilation, groups=self._groups,
            data_format=self._data_format, channel_dim=self._channel_dim, op_type=self._op_type,
            use_cudnn=self._use_cudnn)
        if native.runs_natively(out, self.weight, self.bias):  # the same sums, one compiled pass
            return native.native_add_channel_bias(out, self.bias)
        return add_into(out, self.bias.reshape([-1, 1, 1]))
