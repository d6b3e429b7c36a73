"""Layers every family's reference shares: the training-time regularisers, as timm defines them
(the official code of all four families imports them from timm)."""
from __future__ import annotations

import torch
import torch.nn as nn


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """Stochastic depth: each sample's residual branch is kept with probability 1 - p and the kept
    ones are scaled by 1 / (1 - p); identity in eval or at rate 0."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


def drop_path_schedule(drop_path_rate: float, depths) -> list:
    """The official per-block rates: linspace(0, rate, total depth), split by stage."""
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    out, start = [], 0
    for depth in depths:
        out.append(rates[start:start + depth])
        start += depth
    return out
