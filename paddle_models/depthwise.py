"""Large-kernel depthwise convolution, fast on CPU in dygraph.

Paddle 3.3's CPU kernel for a depthwise convolution with a large kernel is a direct loop that
runs 5-50x slower than torch's (FCViT's 11x11 ``dw1`` / ``dw2``: 156 ms where torch takes 3 ms on
[8, 64, 56, 56]).  ``DepthwiseConv2D`` is an ``nn.Conv2D`` (same parameters, same state-dict keys,
same initialisation) whose dygraph forward computes the same cross-correlation by torch2paddle's
compiled kernel (``native.py``: faster, and closer to float64) or, where that is not built, by FFT:

    y = irfft2(rfft2(x, s) * rfft2(flip(w), s), s)[k-1-p : k-1-p+H, k-1-p : k-1-p+W] + b

with s >= H + k - 1 per axis (a 5-smooth length, so the FFT stays fast), i.e. the linear
convolution, free of wrap-around.  Measured single-threaded against Paddle's own ``F.conv2d``
(forward; forward + backward): [8, 64, 56, 56] 5.3x; 5.6x, [8, 128, 28, 28] 4.4x; 3.7x,
[8, 320, 14, 14] 4.6x; 3.3x, [8, 512, 7, 7] 1.7x; 1.5x, [1, 512, 7, 7] a tie, [1, 64, 200, 304]
(a dense backbone at 800x1216) 5.3x.  Results within ~5e-7 of max |output|, forward and both
gradients (tests/test_depthwise.py holds 2e-6 on every shape FCViT uses): the size of the
difference between torch's and Paddle's direct kernels themselves.  Autograd runs through the
FFT ops, but the layer uses them only when no gradient is recorded (see ``DepthwiseConv2D``).  Other formulations measured slower than the FFT on every one of these shapes: im2col
(``F.unfold`` or a strided view) + a banded-Toeplitz GEMM (1-2x Paddle's conv: the copies cost more
than the GEMM), a dense per-channel matrix (only faster at 7x7, batch 8), Paddle's conv in NHWC.

Inside a static graph (``paddle.jit.to_static`` / ``export``) the layer stays ``F.conv2d``:
Paddle Inference with oneDNN (its CPU default) has a faster depthwise kernel of its own (28 ms on
[8, 64, 56, 56], one thread; Paddle's dygraph kernel 284 ms), and a program holding the FFT ops
crashes Paddle Inference 3.3.1 under oneDNN (glibc: "malloc assertion failure in _int_malloc").
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F

from .layers import Conv2D, add_into, conv_may_take_eager_route, is_same_depthwise, native_depthwise_applies


def _smooth_length(n: int) -> int:
    """The smallest m >= n with no prime factor above 5 (FFT lengths pocketfft is fast at)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_lengths(x, k: int) -> list:
    """The FFT lengths for a k x k kernel over ``x``'s map: the linear convolution's, 5-smooth."""
    return [_smooth_length(x.shape[2] + k - 1), _smooth_length(x.shape[3] + k - 1)]


def kernel_spectrum(weight, s):
    """The rfft2, at lengths ``s``, of a depthwise weight [C, 1, k, k] flipped (a cross-correlation)."""
    c, k = weight.shape[0], weight.shape[-1]
    return paddle.fft.rfft2(weight.reshape([c, k, k]).flip([1, 2]), s=s)


def depthwise_conv2d_fft(x, weight, bias=None, weight_spectrum=None):
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for an odd k x k kernel, stride 1, by
    FFT; ``weight_spectrum``: ``kernel_spectrum(weight, fft_lengths(x, k))`` if already at hand."""
    _, c, h, w = x.shape
    k = weight.shape[-1]
    p = k // 2
    s = fft_lengths(x, k)
    if weight_spectrum is None:
        weight_spectrum = kernel_spectrum(weight, s)
    spectrum = paddle.fft.rfft2(x, s=s) * weight_spectrum
    # paddle.crop copies the window densely; a slice is a strided view whose next op copies it ~3x
    # slower (the crop plus the bias on [8, 64, 56, 56]: 10 ms, by a slice 33 ms)
    y = paddle.crop(paddle.fft.irfft2(spectrum, s=s), [x.shape[0], c, h, w], [0, 0, k - 1 - p, k - 1 - p])
    return y if bias is None else add_into(y, bias.reshape([c, 1, 1]))  # not [1, C, 1, 1]: see layers.Conv2D


def cached_kernel_spectrum(layer, s):
    """``kernel_spectrum(layer.weight, s)``, kept on the layer for as long as its weight holds the same
    values: an exact comparison with a copy of the weight decides, so a weight loaded, trained or
    edited in place is never served a stale spectrum (the comparison is ~20 us; the kernels' FFT,
    flip and padding were ~10% of fcvit_b12's dygraph forward at batch 1).  Costs one spectrum per
    layer and map size in memory (fcvit_b12 at 224: ~20 MiB)."""
    weight = layer.weight
    cached = layer.__dict__.get("_kernel_spectrum")
    if (cached is not None and cached[0] == s and cached[1].shape == weight.shape and cached[1].dtype == weight.dtype
            and bool(paddle.equal_all(cached[1], weight))):
        return cached[2]
    spectrum = kernel_spectrum(weight, s)
    object.__setattr__(layer, "_kernel_spectrum", (list(s), weight.detach().clone(), spectrum))
    return spectrum


def fft_forward(layer, x):
    """``layer`` (an ``nn.Conv2D`` for which ``fft_applies``) on ``x``, by FFT."""
    spectrum = cached_kernel_spectrum(layer, fft_lengths(x, layer.weight.shape[-1]))
    return depthwise_conv2d_fft(x, layer.weight, layer.bias, spectrum)


def fft_applies(layer, x) -> bool:
    """Whether ``layer`` (an ``nn.Conv2D``) on ``x`` is run by ``depthwise_conv2d_fft``: a float32
    dygraph call recording no gradient (see ``DepthwiseConv2D`` on training), a depthwise conv, stride
    1, an odd square kernel of 5 or more, 'same' zero padding.  From 5x5 up the FFT beats Paddle's
    kernel on the maps the models use (5x5 at batch 8: [8, 64, 56, 56] 40 -> 22 ms, [8, 256, 14, 14]
    15 -> 9 ms); at 3x3 Paddle's own kernel is faster.  Only ``DepthwiseConv2D`` (FCViT's 11x11
    convs) asks: BiFormer's 5x5 LePE keeps Paddle's kernel for precision (``biformer.Conv2D``)."""
    return conv_may_take_eager_route(layer, x) and is_same_depthwise(layer) and layer.weight.shape[-1] >= 5


class DepthwiseConv2D(Conv2D):
    """``nn.Conv2D(channels, channels, k, padding=k // 2, groups=channels)`` (odd k, stride 1).  In
    dygraph when no gradient is recorded (eval, verify, inference): the compiled kernel
    (``paddle_models/native.py``; 11x11, one thread, benchmarks/kernel_benchmark.py: [8, 64, 56, 56]
    30.8 ms, the FFT 33.5; [8, 512, 7, 7] 12.6 vs 25.3; [1, 64, 56, 56] 3.1 vs 6.0; closer to float64
    than the FFT or Paddle's conv), or the FFT
    where that kernel is not built; Paddle's conv otherwise and in a static graph.

    Why not train through the FFT (it is differentiable, and its gradients are within 5e-7 of the
    conv's relative to their largest element): an FFT's rounding error is spread evenly over the
    output, relative to the largest value, where a direct conv's is relative to each element.  A
    weight-gradient element far smaller than its tensor's largest then carries an error that is large
    for itself, and AdamW, which divides each element by its own running magnitude, turns that into
    whole +-lr steps: after 3 AdamW steps of fcvit_tiny, 9542 of the 19360 elements of
    ``network.4.0.token_mixer.dw1.weight`` were off torch's by more than 1e-5 of the tensor's scale,
    where torch float32 vs float64 has none (tests/test_train_fcvit.py).  So training computes what
    it computed before, with Paddle's kernel."""

    def __init__(self, channels, kernel_size, weight_attr=None, bias_attr=None):
        if kernel_size % 2 != 1:
            raise ValueError(f"DepthwiseConv2D takes an odd kernel size, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                         weight_attr=weight_attr, bias_attr=bias_attr)

    def forward(self, x):
        if fft_applies(self, x) and not native_depthwise_applies(self, x):
            return fft_forward(self, x)
        return Conv2D.forward(self, x)  # not super(): dy2static rewrites this method; the compiled kernel's route
