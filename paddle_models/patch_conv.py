"""Strided convolutions whose kernel spans several strides, fast on CPU in dygraph.

CrossFormer's cross-scale stem convolves the image with 4x4, 8x8, 16x16 and 32x32 kernels at
stride 4.  Paddle 3.3's CPU conv unfolds every output's receptive field first (im2col): for the
32x32 kernel a 3072 x 3136 matrix per image, 152 ms on [8, 3, 224, 224] where torch takes 18 ms.
``patch_conv2d`` computes the same convolution from the stride's space-to-depth instead.  With
stride r, kernel K = k r and the padded image's r x r blocks ``u = pixel_unshuffle(x, r)``,

    y[o, i, j] = sum_a z[(a, o), i + a, j],   z = conv2d(u, w'),  w' of kernel 1 x k,

where w'[(a, o), (c, dy, dx), 0, b] = w[o, c, a r + dy, b r + dx]: one GEMM-shaped conv whose
unfolded input is k times smaller than the image's, then k shifted rows summed.  Measured single
threaded (batch 8; batch 1): the 32x32 kernel 152 -> 41 ms; 35 -> 5.7 ms, 16x16 26 -> 22 ms;
4.6 -> 2.8 ms; at 8x8 and 4x4 (k = 2, 1) Paddle's conv is faster, so ``PatchConv2D`` uses the form
from k = 4.  Results within float32 noise of the direct conv (tests/test_patch_conv.py): the
products are the same, summed in another order.

Only where no gradient is recorded, for the reason ``depthwise.DepthwiseConv2D`` gives: training
computes what it computed before, with Paddle's kernel.  Inside a static graph (export) it stays
``F.conv2d``: oneDNN's direct conv needs no unfolding.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F

from .layers import Conv2D, add_into, conv_may_take_eager_route

MIN_KERNEL_STRIDES = 4  # k = K / r from which the space-to-depth form is faster (see above)


def patch_conv2d(x, weight, bias, stride: int, padding: int):
    """``F.conv2d(x, weight, bias, stride=stride, padding=padding)`` for a square kernel that is a
    multiple of ``stride``, by the stride's space-to-depth."""
    b, c, h, w = x.shape
    o, _, kernel, _ = weight.shape
    r, k = stride, kernel // stride
    out_h, out_w = (h + 2 * padding - kernel) // r + 1, (w + 2 * padding - kernel) // r + 1
    # rows / columns [-padding, r (out + k - 1) - padding) of the image: zero padding before, and
    # after either zeros or the rows no output reads dropped
    need_h, need_w = r * (out_h + k - 1) - padding, r * (out_w + k - 1) - padding
    if need_h < h or need_w < w:
        x = paddle.crop(x, [b, c, min(h, need_h), min(w, need_w)])
        h, w = min(h, need_h), min(w, need_w)
    u = F.pixel_unshuffle(F.pad(x, [padding, need_w - w, padding, need_h - h]), r)
    rows = weight.reshape([o, c, k, r, k, r]).transpose([2, 0, 1, 3, 5, 4]).reshape([k * o, c * r * r, 1, k])
    z = F.conv2d(u, rows)  # [b, k o, out_h + k - 1, out_w]
    y = paddle.crop(z, [b, o, out_h, out_w], [0, 0, 0, 0])
    for a in range(1, k):
        y = y.add_(paddle.crop(z, [b, o, out_h, out_w], [0, a * o, a, 0]))
    return y if bias is None else add_into(y, bias.reshape([o, 1, 1]))


def patch_conv_applies(layer, x) -> bool:
    """Whether ``layer`` (an ``nn.Conv2D``) on ``x`` is run by ``patch_conv2d``: a float32 dygraph
    call recording no gradient, groups 1, equal strides r, a square kernel of at least
    ``MIN_KERNEL_STRIDES`` r that r divides, equal zero padding on all sides, NCHW."""
    r, kernel = layer._stride[0], layer.weight.shape[-1]
    return (conv_may_take_eager_route(layer, x)
            and layer._groups == 1 and list(layer._stride) == [r, r]
            and layer.weight.shape[-2] == kernel and kernel % r == 0 and kernel // r >= MIN_KERNEL_STRIDES)


class PatchConv2D(Conv2D):
    """``nn.Conv2D`` (``layers.Conv2D``: same parameters, state-dict keys and initialisation) that runs
    by ``patch_conv2d`` where ``patch_conv_applies``, by Paddle's conv otherwise."""

    def forward(self, x):
        if patch_conv_applies(self, x):
            return patch_conv2d(x, self.weight, self.bias, self._stride[0], self._updated_padding[0])
        return Conv2D.forward(self, x)  # not super(): dy2static rewrites this method
