"""Layers every family's Paddle port shares; side by side with ``reference_torch/layers.py``."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn


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
