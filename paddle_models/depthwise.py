"""Large-kernel depthwise convolution, fast on CPU in dygraph.

Paddle 3.3's CPU kernel for a depthwise convolution with a large kernel is a direct loop that
runs 5-50x slower than torch's (FCViT's 11x11 ``dw1`` / ``dw2``: 156 ms where torch takes 3 ms on
[8, 64, 56, 56]).  ``DepthwiseConv2D`` is an ``nn.Conv2D`` (same parameters, same state-dict keys,
same initialisation) whose dygraph forward computes the same cross-correlation by FFT instead:

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

from .layers import Conv2D


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


def depthwise_conv2d_fft(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for an odd k x k kernel, stride 1, by FFT."""
    _, c, h, w = x.shape
    k = weight.shape[-1]
    p = k // 2
    s = [_smooth_length(h + k - 1), _smooth_length(w + k - 1)]
    spectrum = paddle.fft.rfft2(x, s=s) * paddle.fft.rfft2(weight.reshape([c, k, k]).flip([1, 2]), s=s)
    y = paddle.fft.irfft2(spectrum, s=s)[:, :, k - 1 - p:k - 1 - p + h, k - 1 - p:k - 1 - p + w]
    return y if bias is None else y + bias.reshape([c, 1, 1])  # not [1, C, 1, 1]: see layers.Conv2D


class DepthwiseConv2D(Conv2D):
    """``nn.Conv2D(channels, channels, k, padding=k // 2, groups=channels)`` (odd k, stride 1): FFT in
    dygraph when no gradient is recorded (eval, verify, inference), Paddle's conv otherwise and in a
    static graph.

    Why not train through the FFT (it is differentiable, and its gradients are within 5e-7 of the
    conv's relative to their largest element): an FFT's rounding error is spread evenly over the
    output, relative to the largest value, where a direct conv's is relative to each element.  A
    weight-gradient element far smaller than its tensor's largest then carries an error that is large
    for itself, and AdamW, which divides each element by its own running magnitude, turns that into
    whole +-lr steps: after 3 AdamW steps of fcvit_tiny, 9542 of the 19360 elements of
    ``network.4.0.token_mixer.dw1.weight`` were off torch's by more than 1e-5 of the tensor's scale,
    where torch float32 vs float64 has none (tests/test_train_fcvit.py).  So training computes what
    it computed before, with Paddle's kernel."""

    def _records_gradient(self, x) -> bool:
        if not paddle.is_grad_enabled():
            return False
        return not (x.stop_gradient and self.weight.stop_gradient and (self.bias is None or self.bias.stop_gradient))

    def __init__(self, channels, kernel_size, weight_attr=None, bias_attr=None):
        if kernel_size % 2 != 1:
            raise ValueError(f"DepthwiseConv2D takes an odd kernel size, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                         weight_attr=weight_attr, bias_attr=bias_attr)

    def forward(self, x):
        if paddle.in_dynamic_mode() and x.dtype == paddle.float32 and not self._records_gradient(x):
            return depthwise_conv2d_fft(x, self.weight, self.bias)
        return Conv2D.forward(self, x)  # not super(): dy2static rewrites this method
