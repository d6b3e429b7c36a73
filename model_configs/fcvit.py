"""FCViT variants: the resolved official configuration, shared by the torch reference and the
Paddle port (framework-free, so the Paddle side never imports torch).

The official file builds its blocks from a module-level dict that the factories mutate through
a shallow copy; the values below are what every released model was actually built with.
"""
from __future__ import annotations

from dataclasses import dataclass


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


CONFIGS = {
    "fcvit_tiny": FCViTConfig(layers=(3, 3, 5, 2), embed_dims=(32, 64, 160, 320)),
    "fcvit_b12": FCViTConfig(layers=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512)),
    "fcvit_b24": FCViTConfig(layers=(4, 4, 12, 4), embed_dims=(64, 128, 320, 512)),
    "fcvit_b48": FCViTConfig(layers=(8, 8, 24, 8), embed_dims=(64, 128, 320, 512)),
}
