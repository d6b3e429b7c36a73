"""Reductions with float64 accumulation, for the Paddle ports.

torch's CPU reductions (mean, std_mean, GroupNorm statistics) accumulate float32 inputs in
double or pairwise and land within ~1e-7 of the exact value; Paddle's float32 reductions
sum naively and drift by ~2e-6 over a 56x56 map.  Accumulating in float64 and rounding back
once puts the Paddle side at the exact value too, so what remains between the frameworks
is float32 noise, not the reduction algorithm.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn


def mean(x, axis, keepdim=False):
    return x.astype("float64").mean(axis=axis, keepdim=keepdim).astype(x.dtype)


def std_mean(x, axis, keepdim=False):
    """(unbiased std, mean), like ``torch.std_mean``."""
    x64 = x.astype("float64")
    return (paddle.std(x64, axis=axis, keepdim=keepdim).astype(x.dtype),
            x64.mean(axis=axis, keepdim=keepdim).astype(x.dtype))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) with float64 statistics."""

    def forward(self, x):
        b, c = x.shape[0], x.shape[1]
        groups = self._num_groups
        x64 = x.astype("float64").reshape([b, groups, -1])
        mu = x64.mean(axis=-1, keepdim=True)
        var = ((x64 - mu) ** 2).mean(axis=-1, keepdim=True)
        y = ((x64 - mu) / paddle.sqrt(var + self._epsilon)).astype(x.dtype).reshape(x.shape)
        shape = [1, c] + [1] * (len(x.shape) - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


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
