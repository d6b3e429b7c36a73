"""FCViT variants: the resolved official configuration, shared by the torch reference and the
Paddle port (framework-free, so the Paddle side never imports torch).

The official file builds its blocks from a module-level dict that the factories mutate through
a shallow copy; the values below are what every released model was actually built with.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class FCViTConfig:
    layers: tuple
    embed_dims: tuple
    mlp_ratios: tuple = (8, 8, 4, 4)
    gc_heads: int = 8  # GlobalContext heads
    gc_reduction: int = 8  # compete bottleneck: fc1 C -> 2C/8, max over pairs, fc2 C/8 -> C
    gc_eps: float = 1e-5  # added to the std, not the variance
    mix_kernel: int = 11  # depthwise kernel of both token-mixing convs
    mix_reduction: int = 8  # token-mixer 1x1 bottleneck width: max(C // 8, 16)
    mix_min_width: int = 16
    channel_dw_kernel: int = 3
    layer_scale_init: float = 1e-5

    def mix_width(self, dim: int) -> int:
        return max(dim // self.mix_reduction, self.mix_min_width)

    def drop_path_rates(self, drop_path_rate: float) -> list:
        """The official per-block drop-path rates, one list per stage (models/fcvit.py:374, in
        ``basic_blocks``): rate x (global block index) / (total blocks - 1), in Python floats --
        linspace(0, rate, total) as the official code computes it, so the rates are exactly its
        (``drop_path_schedule``'s float32 linspace differs from them by ~1e-9).  A block at rate 0
        gets no DropPath at all (``nn.Identity``), like the first block."""
        total = sum(self.layers)
        rates, start = [], 0
        for depth in self.layers:
            rates.append([drop_path_rate * (j + start) / (total - 1) for j in range(depth)])
            start += depth
        return rates

    def input_problem(self, height: int, width: int) -> Optional[str]:
        """Convolutions and global context only: any size the 7x7/4 stem can take."""
        if height < 1 or width < 1:
            return f"input {height}x{width} is empty"
        return None


# Training-time defaults (models/fcvit.py): every factory (544-670) and the *_feat classes (673-729)
# leave ``drop_rate`` and ``drop_path_rate`` at BaseFormer's defaults, 0.0 and 0.0 (394); the README's
# ImageNet recipe passes --drop-path 0.1 / 0.1 / 0.1 / 0.2 (tiny / b12 / b24 / b48, README.md:97) through
# train.py (--drop-path, default None: not passed, 233 and 389; --drop default 0.0, 229), and the
# mmdet / mmseg configs pass neither (so 0.0 for the dense backbones).  There is no attention dropout.
DEFAULT_DROP_RATE = 0.0
DEFAULT_DROP_PATH_RATE = 0.0
README_DROP_PATH_RATE = {"fcvit_tiny": 0.1, "fcvit_b12": 0.1, "fcvit_b24": 0.1, "fcvit_b48": 0.2}

CONFIGS = {
    "fcvit_tiny": FCViTConfig(layers=(3, 3, 5, 2), embed_dims=(32, 64, 160, 320)),
    "fcvit_b12": FCViTConfig(layers=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512)),
    "fcvit_b24": FCViTConfig(layers=(4, 4, 12, 4), embed_dims=(64, 128, 320, 512)),
    "fcvit_b48": FCViTConfig(layers=(8, 8, 24, 8), embed_dims=(64, 128, 320, 512)),
}

# The dense backbones ``fcvit_b12_feat`` / ``fcvit_b24_feat`` (models/fcvit.py:673-729): the
# classification configuration with layer-scale init 1e-6 instead of 1e-5.
DENSE_CONFIGS = {
    "fcvit_b12_feat": replace(CONFIGS["fcvit_b12"], layer_scale_init=1e-6),
    "fcvit_b24_feat": replace(CONFIGS["fcvit_b24"], layer_scale_init=1e-6),
}
