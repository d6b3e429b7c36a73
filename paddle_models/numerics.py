"""Reductions as accurate as torch's, for the Paddle ports.

torch's CPU reductions (mean, std_mean, GroupNorm statistics) sum float32 inputs pairwise
(cascade) and land within ~1e-7 of the exact value; Paddle's float32 reductions sum naively and
drift by ~2e-6 over a 56x56 map.  So:

* ``mean`` over trailing axes stays in float32: a blocked mean (nested means of at most 16
  values each, as a pairwise sum nests its halves: error ~log(N) eps instead of N eps),
  then one correction pass, mu + mean(x - mu), which lands within rounding of the exact mean
  (measured: 1.2e-7 on means of ~2 over 56x56, as float64 rounded once; torch 4e-7).  The
  correction is left out of autograd: the gradient of a mean is 1/N either way, and through the
  blocked mean alone it stays exact.  Half inputs are reduced in float32.  Other axes (BiFormer's
  region means, which only route) are reduced in float64, rounded once: faster on CPU than a
  permutation and a float32 mean, and correctly rounded; in a traced graph, over the second-to-last
  axis, by one batched matmul with a row of ones (Paddle Inference's casts and reduction cost more).
* ``GroupNorm`` in float32 the same way: corrected blocked mean, then the biased variance as the
  blocked mean of the centred squares.  Its backward is written out (``_NormalizeRows``) so the two
  row means it needs are blocked too; autograd would take them with Paddle's naive float32 sum (a
  correction pass helps only a mean that is large against the spread: on zero-mean gradients it
  tripled the error).  ``layer_norm`` and ``add_bias`` (BiFormer's training path) likewise: their
  weight and bias gradients, sums over every token, as blocked means.  Measured on
  [8, 64, 56, 56] (one group) against torch float64: forward 9.4e-8 and input gradient 1.4e-7 of
  their max, torch float32 7.7e-8 and 1.1e-7; 22 ms forward in dygraph, where the float64 version
  took 32 ms.  No float64 in a model people train on GPUs with AMP (half inputs: float32 inside).
* ``std_mean`` (FCViT's GlobalContext, a [B, heads, positions] map): the corrected mean, then the
  blocked mean of the centred squares, scaled to the unbiased variance; its square is a product
  (``paddle.std`` breaks under oneDNN: see onednn.py).
* In a traced graph (an export, run by Paddle Inference) a mean over the last axis and ``std_mean``
  over trailing axes take products of the map as it lies with block columns of ones
  (``_traced_trailing_mean``): a static reshape copies its input where that is read again, and the
  ops of the rows form cost more than their precision buys there (within ~1x torch float32's error
  on both of MKL's CPU paths, without the correction pass).
"""
from __future__ import annotations

import functools
import math

import paddle
import paddle.nn as nn

from . import native
from .layers import constant_shape


@functools.lru_cache(maxsize=None)  # called per reduction, per forward: factor each size once
def _levels(n: int, limit: int = 16) -> tuple:
    """n as a product of factors of at most ``limit`` each (a larger prime factor stands alone):
    the sizes of the successive partial means that ``_blocked_mean`` takes."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    levels, current = [], 1
    for prime in primes:
        if current > 1 and current * prime > limit:
            levels.append(current)
            current = 1
        current *= prime
    return tuple(levels + [current])


@functools.lru_cache(maxsize=None)
def _chunk_length(n: int, shortest: int = 256, longest: int = 2048) -> int:
    """The largest divisor of n in [shortest, longest] (n itself when n <= longest, or none is)."""
    if n <= longest:
        return n
    return next((size for size in range(longest, shortest - 1, -1) if n % size == 0), n)


def _as_chunks(x, n: int):
    """``x``'s rows of n values as chunks of at most 2048 (``_chunk_length``), [rows x chunks, chunk],
    and how many chunks make a row.  (A copy of the map where ``x`` is used again: Paddle's static
    reshape copies unless its input dies there.)"""
    chunk = _chunk_length(n)
    return x.reshape([-1, chunk]), n // chunk


def _mean_of_chunks(chunks, per_row: int, n: int):
    """Each row's mean [M, 1] from its chunks [M x per_row, chunk] (``_as_chunks``): each chunk summed
    by a matrix-vector product with a column of ones, then the chunks' sums."""
    sums = paddle.matmul(chunks, paddle.ones([chunks.shape[-1], 1], dtype=chunks.dtype)).reshape([-1, per_row])
    return (sums.sum(axis=1, keepdim=True) if per_row > 1 else sums) * (1.0 / n)


def _column_blocks(n: int) -> int:
    """How many blocks a traced sum splits a last axis of ``n`` values into: the largest divisor of
    ``n`` up to 16 that leaves each block at least 64 values (1: one column, for short or prime axes)."""
    return max((k for k in range(1, 17) if n % k == 0 and n // k >= 64), default=1)


def _traced_trailing_mean(x, axes: list):
    """``x``'s mean over its trailing ``axes`` (keepdim) in a traced graph, without reshaping ``x``: a
    matrix product with a block column of ones per ``_column_blocks`` sums each block of every row of
    the last axis, a matrix-vector product over those sums (reshaped, fresh, so a view) holding 1/n
    sums the rest, so no scale follows it.  Blocks, not one column of ones: a GEMV's running sum
    depends on MKL's code path, and on an AMD CPU's generic one a single column over 3136 values landed
    3.7-4.4x torch float32's error of the exact mean, blocks of >= 64 values 0.7-1.1x (AVX2 path 1.2-1.6x
    and 0.6-1.0x).  Paddle's static reshape copies a tensor that is read again, and a mean's input
    usually is (FCViT's GlobalContext reads its map three more times).  No correction pass: x - mu over
    a 4-D map broadcast along its last axis runs ~10x slower under oneDNN (fcvit_b12 batch 1, oneDNN on:
    136 ms of its subtracts).  A scale or add right after a matmul would be fused into oneDNN's matmul,
    slower on these products."""
    n = math.prod(x.shape[a] for a in axes)
    last = x.shape[-1]
    blocks = _column_blocks(last)
    if len(axes) == 1 and blocks == 1:
        return paddle.matmul(x, paddle.full([last, 1], 1.0 / n, dtype=x.dtype))
    block_ones = paddle.kron(paddle.eye(blocks, dtype=x.dtype), paddle.ones([last // blocks, 1], dtype=x.dtype))
    sums = paddle.matmul(x, block_ones)  # [..., blocks]
    if len(axes) == 1:
        return paddle.matmul(sums, paddle.full([blocks, 1], 1.0 / n, dtype=x.dtype))
    # the targets keep the first axis as a 0 ("as the input's"): under oneDNN a matmul followed by a
    # reshape to an all-constant target (a fixed-batch export's) is fused into one op that comes out
    # wrong (biformer_stl_nchw's pooled features at batch 3: logits 1.85 off); the pass skips a 0
    kept = [0] + constant_shape(x.shape[1:axes[0]]) if axes[0] > 0 else []
    count = n // last * blocks
    means = paddle.matmul(sums.reshape(kept + [count]), paddle.full([count, 1], 1.0 / n, dtype=x.dtype))
    return means.reshape(kept + [1] * len(axes))


def _blocked_mean(rows, n: int):
    """The mean of each row of ``rows`` [M, n], keepdim [M, 1].

    Dygraph: nested means of at most 16 values (``_levels``): rounding error ~log16(n) times a
    16-term sum's, as a pairwise sum's, instead of Paddle's n eps (measured: as accurate as numpy's
    float32 pairwise mean, and as fast as Paddle's plain mean on [8, 200704]).
    A static graph (an export, run by Paddle Inference) sums contiguous chunks of at most 2048 values
    (``_chunk_length``) by a matrix-vector product with a column of ones, then the chunks' sums:
    measured as accurate as the chunks' means it replaced (fcvit_b12's exported logits a little
    closer to float64), and Paddle Inference runs it ~3x faster than its own reduction (``mean`` over
    a [1, 200704] map: 0.18 ms; the product 0.06), where oneDNN is slow on the nested form's short
    axes and reshapes (a [8, 64, 56, 56] GroupNorm under oneDNN: 35 ms nested, ~20 ms chunked)."""
    if not paddle.in_dynamic_mode():
        return _mean_of_chunks(*_as_chunks(rows, n), n)
    partial = rows
    for size in _levels(n):
        partial = partial.reshape([-1, size]).mean(axis=-1)
    return partial.reshape([-1, 1])


def _row_mean(rows, n: int):
    """The blocked mean plus one correction pass, mu + mean(x - mu): within rounding of the exact
    mean of each row (the correction is what a float64 sum would add back).  The correction is kept
    out of autograd: the gradient of a mean is 1/n either way."""
    mu = _blocked_mean(rows, n)
    return mu + _blocked_mean(rows - mu, n).detach()


@paddle.jit.not_to_static  # plain Python over a shape: dy2static would make its loops graph control flow
def _trailing_reduction(shape, axis, keepdim: bool):
    """For a reduction over ``axis`` of a tensor of ``shape``: (n, the values each result reduces; the
    result's shape), or None where the reduced axes are not the trailing ones or a reduced size is
    unknown until run time (a traced graph's dynamic axis, not an int)."""
    rank = len(shape)
    axes = sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis))
    if axes != list(range(rank - len(axes), rank)):
        return None
    if not all(isinstance(shape[a], int) and shape[a] > 0 for a in axes):
        return None
    kept = constant_shape(shape[:rank - len(axes)])  # a traced dynamic batch as -1: no ops build the target
    return math.prod(shape[rank - len(axes):]), (kept + [1] * len(axes) if keepdim else kept)


def _as_rows(x, axis, keepdim: bool):
    """``x`` as float32 rows [M, n], each the n values one reduction over ``axis`` takes, with n and
    the reduction's result shape; None where ``_trailing_reduction`` is."""
    plan = _trailing_reduction(x.shape, axis, keepdim)
    if plan is None:
        return None
    n, shape = plan
    rows = x.reshape([-1, n])
    return (rows if rows.dtype == paddle.float32 else rows.astype("float32")), n, shape


def _corrected_mean(rows, n: int):
    """``_row_mean``, by the compiled kernel where it may run (dygraph, nothing recorded, CPU)."""
    if native.runs_natively(rows):  # the same mean, one compiled pass (native.native_row_mean)
        return native.native_row_mean(rows).reshape([-1, 1])
    return _row_mean(rows, n)


def _traced_penultimate_axis(x, axis) -> bool:
    """Whether ``mean(x, axis)`` is, in a traced graph, over a float32 ``x``'s second-to-last axis of a
    known size (BiFormer's region means)."""
    rank = len(x.shape)
    return (not paddle.in_dynamic_mode() and isinstance(axis, int) and rank >= 2 and axis % rank == rank - 2
            and x.dtype == paddle.float32 and isinstance(x.shape[-2], int) and x.shape[-2] > 0)


def _penultimate_mean(x, keepdim: bool):
    """The mean over ``x``'s second-to-last axis as a row of ones times each [n, d] matrix: one batched
    matmul, for Paddle Inference, where the float64 form is a cast of the map, Paddle's reduction and
    a cast back (biformer_small at batch 1: 120 casts and 54 means, ~5% of its forward).  Each output
    is the GEMM's running sum of n terms: on BiFormer's [2, 98, 64, 32] up to ~2x torch float32's own
    error of the exact mean (1.2e-6 vs 5.5e-7 on means ~3), where the float64 form rounds once; the
    export's logits stay as far from torch float64 as before (RMS 1.41e-7 under oneDNN fused-only)."""
    n = x.shape[-2]
    means = paddle.matmul(paddle.ones([1, n], dtype=x.dtype), x) / n
    return means if keepdim else means.squeeze(-2)


@paddle.jit.not_to_static  # plain Python over the traced shape
def _traced_trailing_axes(x, axis):
    """For ``mean(x, axis)`` / ``std_mean`` in a traced graph over a float32 ``x``'s trailing axes of
    known sizes (``_trailing_reduction``'s test): those axes, ascending; None otherwise (dygraph included)."""
    if paddle.in_dynamic_mode() or x.dtype != paddle.float32 or _trailing_reduction(x.shape, axis, True) is None:
        return None
    rank, count = len(x.shape), 1 if isinstance(axis, int) else len(axis)
    return list(range(rank - count, rank))


def mean(x, axis, keepdim=False):
    """``x.mean(axis, keepdim)`` within rounding of the exact mean, in float32 (half inputs too).  A
    traced graph over the last axis: ``_traced_trailing_mean``, within ~1x torch float32's error.  Over
    several axes a traced graph keeps the rows form: the two products came out wrong under oneDNN in
    biformer_stl_nchw's fixed-batch export (its pooled features after a BatchNorm: logits 1.85 off;
    not reproduced on a BatchNorm + mean + Linear alone), and a head's pooling gains nothing from them."""
    axes = _traced_trailing_axes(x, axis)
    if axes is not None and len(axes) == 1:
        means = _traced_trailing_mean(x, axes)
        return means if keepdim else means.squeeze(axes)
    as_rows = _as_rows(x, axis, keepdim)
    if as_rows is None:
        # Axes that are not trailing (BiFormer's region means, which only route: never differentiated)
        # or sizes unknown until run time: float64, rounded once.  Moving the axes last for the
        # float32 form costs a dense permutation, up to 6x the float64 mean (measured on BiFormer's
        # [8, 392, 4, 32]: 8.2 vs 1.3 ms), and Paddle's float32 mean over a middle axis is slow too.
        if isinstance(axis, int) and native.runs_natively(x):  # float32 CPU, nothing recorded
            out = native.native_axis_mean(x, axis)  # the same double sum, one compiled pass, no float64 copy
            return out.unsqueeze(axis) if keepdim else out
        if _traced_penultimate_axis(x, axis):
            return _penultimate_mean(x, keepdim)
        return x.astype("float64").mean(axis=axis, keepdim=keepdim).astype(x.dtype)
    rows, n, shape = as_rows
    return _corrected_mean(rows, n).reshape(shape).astype(x.dtype)


def std_mean(x, axis, keepdim=False):
    """(unbiased std, mean), like ``torch.std_mean``, in float32: the corrected mean, then the
    blocked mean of the centred squares times n / (n - 1); the square as a product (``paddle.std``
    squares through a ``pow`` that breaks under oneDNN: see onednn.py).  A traced graph over trailing
    axes: the mean and the centred squares' mean by ``_traced_trailing_mean``, x not reshaped (9 ops
    where the rows form took 22: fcvit_b12's GlobalContexts call it 24 times per forward)."""
    axes = _traced_trailing_axes(x, axis)
    n = math.prod(x.shape[a] for a in axes) if axes is not None else 0
    if n > 1:
        mu = _traced_trailing_mean(x, axes)
        centred = x - mu
        std = paddle.sqrt(_traced_trailing_mean(centred * centred, axes) * (n / (n - 1)))
        return (std, mu) if keepdim else (std.squeeze(axes), mu.squeeze(axes))
    as_rows = _as_rows(x, axis, keepdim)
    if as_rows is None or as_rows[1] <= 1:  # as mean's; or one value (std nan): Paddle's own, float64
        x64 = x.astype("float64")
        return (paddle.std(x64, axis=axis, keepdim=keepdim).astype(x.dtype),
                x64.mean(axis=axis, keepdim=keepdim).astype(x.dtype))
    rows, n, shape = as_rows
    mu = _corrected_mean(rows, n)
    centred = rows - mu
    var = _blocked_mean(centred * centred, n) * (n / (n - 1))
    return paddle.sqrt(var).reshape(shape).astype(x.dtype), mu.reshape(shape).astype(x.dtype)


def _normalized_rows(rows, n: int, eps: float):
    """((x - mean) / sqrt(var + eps), 1 / sqrt(var + eps)) of each row of ``rows`` [M, n]: biased
    variance, float32 statistics within rounding of float64 ones: the mean corrected (it is
    subtracted, so its error counts against the spread, not the mean), the rest blocked means."""
    centred = rows - _row_mean(rows, n)
    inv_std = paddle.rsqrt(_blocked_mean(centred * centred, n) + eps)
    return centred * inv_std, inv_std


class _NormalizeRows(paddle.autograd.PyLayer):
    """``_normalized_rows`` with its gradient written out, so the backward's two row means are
    blocked too (autograd would sum N gradient terms with Paddle's naive float32 sum):
        dx = inv_std * (g - mean(g) - xhat * mean(g * xhat))"""

    @staticmethod
    def forward(ctx, rows, n, eps):
        normalized, inv_std = _normalized_rows(rows, n, eps)
        ctx.save_for_backward(normalized, inv_std)
        ctx.n = n
        return normalized

    @staticmethod
    def backward(ctx, grad):
        normalized, inv_std = ctx.saved_tensor()
        n = ctx.n
        return inv_std * (grad - _blocked_mean(grad, n) - normalized * _blocked_mean(grad * normalized, n))


def _channel_sums(grad, channel_axis: int):
    """The sum of ``grad`` over every axis but ``channel_axis``: [C], within rounding of the exact
    sum (the channels made rows, their blocked means times the count).  A bias or norm
    weight gradient sums N x H x W terms; Paddle's float32 reduction of them is 5-15x less
    accurate than torch's."""
    rank = len(grad.shape)
    channel_axis %= rank
    channels = grad.shape[channel_axis]
    rows = grad.transpose([channel_axis] + [a for a in range(rank) if a != channel_axis]).reshape([channels, -1])
    return _blocked_mean(rows, rows.shape[1]).reshape([channels]) * rows.shape[1]


class _AddBias(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, y, bias, channel_axis):
        ctx.channel_axis = channel_axis
        shape = [1] * (len(y.shape) - channel_axis % len(y.shape))
        shape[0] = -1
        return y + bias.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, _channel_sums(grad, ctx.channel_axis)


def add_bias(y, bias, channel_axis: int = -1):
    """``y + bias`` along ``channel_axis`` (the same float32 values), its bias gradient summed as
    accurately as torch sums it (``_channel_sums``)."""
    return _AddBias.apply(y, bias, channel_axis)


class _LayerNormRows(paddle.autograd.PyLayer):
    """LayerNorm of each row of ``rows`` [M, C] with statistics, input gradient and weight / bias
    gradients all formed by blocked means (as torch's kernels are accurate, not as
    Paddle's float32 layer_norm backward, which rounds its two nearly equal terms 3-7x worse)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, eps):
        normalized, inv_std = _normalized_rows(rows, rows.shape[1], eps)
        ctx.save_for_backward(normalized, inv_std, weight)
        return normalized * weight + bias

    @staticmethod
    def backward(ctx, grad):
        normalized, inv_std, weight = ctx.saved_tensor()
        n = grad.shape[1]
        scaled = grad * weight
        d_rows = inv_std * (scaled - _blocked_mean(scaled, n) - normalized * _blocked_mean(scaled * normalized, n))
        return d_rows, _channel_sums(grad * normalized, 1), _channel_sums(grad, 1)


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis of a float32 ``x`` (affine), as accurate as torch's forward and
    backward, in float32 (``_LayerNormRows``)."""
    channels = x.shape[-1]
    return _LayerNormRows.apply(x.reshape([-1, channels]), weight, bias, eps).reshape(x.shape)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) with statistics as accurate as torch's,
    in float32 (half-precision inputs: computed in float32, returned in their dtype).  The affine is
    applied as [C, 1, 1] tensors (see ``layers.Conv2D``: a [1, C, 1, 1] operand takes Paddle's slow
    broadcast path).  Where nothing is recorded for a backward, on CPU, the compiled kernel
    (``native.native_group_norm``: [8, 64, 56, 56] 20 -> 4.8 ms, and as close to float64)."""

    def forward(self, x):
        if native.runs_natively(x, self.weight, self.bias):  # the same statistics, one compiled kernel
            return native.native_group_norm(x, self.weight, self.bias, self._num_groups, self._epsilon)
        c = x.shape[1]
        n = c // self._num_groups
        for size in x.shape[2:]:
            n *= size
        if not paddle.in_dynamic_mode():  # an exported graph: no gradient, and a PyLayer does not trace
            return self._traced_forward(x, n)
        rows = x.reshape([-1, n])
        if rows.dtype != paddle.float32:
            rows = rows.astype("float32")
        normalized = _NormalizeRows.apply(rows, n, self._epsilon)
        y = normalized.astype(x.dtype).reshape([-1] + list(x.shape[1:]))
        shape = [c] + [1] * (len(x.shape) - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    def _traced_forward(self, x, n: int):
        """The forward with fewer passes over the map, for Paddle Inference: the statistics as
        ``_normalized_rows`` forms them (the mean's correction folded into the shift instead of
        subtracted again), each a sum of chunks by a matrix-vector product (``_blocked_mean``), then
        one multiply and one add per element, by a per-(sample, channel) scale and shift, as torch's
        kernel applies them.  The map is copied once, into chunks (fcvit_b12's [1, 64, 56, 56] under
        Paddle Inference, oneDNN for the fused ops only: 1.3 ms, where the form with Paddle's
        reductions and the copies they need took 2.0 in the same run; oneDNN on: 3.8 and 3.9).  The
        squares' sums as each chunk's dot product with itself, by a batched matmul, would save their
        pass but run ~4x slower under oneDNN on."""
        c, groups = x.shape[1], self._num_groups
        chunks, per_group = _as_chunks(x if x.dtype == paddle.float32 else x.astype("float32"), n)
        mean = _mean_of_chunks(chunks, per_group, n)  # [B * G, 1]
        centred = chunks - paddle.expand(mean, [-1, per_group]).reshape([-1, 1])
        correction = _mean_of_chunks(centred, per_group, n)
        squares = _mean_of_chunks(centred * centred, per_group, n)
        inv_std = paddle.rsqrt(squares - correction * correction + self._epsilon)
        scale = inv_std.reshape([-1, groups, 1]) * self.weight.reshape([groups, c // groups])  # [B, G, C/G]
        shift = self.bias.reshape([groups, c // groups]) - correction.reshape([-1, groups, 1]) * scale
        per_channel = centred.reshape([-1, n // (c // groups)])  # [B * C, H * W]
        y = per_channel * scale.reshape([-1, 1]) + shift.reshape([-1, 1])
        return y.astype(x.dtype).reshape([-1] + list(x.shape[1:]))


class BatchNorm2D(nn.BatchNorm2D):
    """``nn.BatchNorm2D`` (same parameters, same state-dict keys) that trains as torch's does.

    Two differences are silent in Paddle's stock layer: its ``momentum`` is 1 - torch's, and its
    running variance is updated with the *biased* batch variance where torch uses the unbiased one
    (x N / (N - 1), N = batch x H x W), so fine-tuned running statistics drift apart.  This layer
    takes torch's ``momentum`` and, after Paddle's own kernel has normalised the batch and updated
    the statistics, rescales the variance update to the unbiased one:
        torch:  v' = (1 - m) v + m s2 N / (N - 1);   Paddle:  p = (1 - m) v + m s2
        =>      v' = (N p - (1 - m) v) / (N - 1)
    Eval mode, the forward and its gradients are Paddle's kernel, untouched."""

    def __init__(self, num_features, momentum=0.1, epsilon=1e-5):
        super().__init__(num_features, momentum=1.0 - momentum, epsilon=epsilon)
        self.torch_momentum = momentum

    def forward(self, x):
        if not self.training or self._use_global_stats:
            return super().forward(x)
        previous = self._variance.detach().clone()
        out = super().forward(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if n > 1:
            with paddle.no_grad():
                keep = 1.0 - self.torch_momentum
                self._variance.set_value((self._variance * n - previous * keep) / (n - 1))
        return out
