"""RegionViT (IBM/RegionViT): official state-dict keys -> Paddle keys.

Everything else is copied as is: convs (depthwise, x2-multiplier and PEG included),
LayerNorms, the (1, C, 1, 1) LayerNorm2d parameters and the raw 2-D ``attn.rel_pos``
table, which is not a Linear and must not be transposed.  ``block.0.proj_cls.*``
are the same tensors as ``block.0.proj.*`` (one module under two names); the Paddle
model lists both names too, so both are copied.  There are no BatchNorms and no
persistent buffers (``rel_pos_index`` and the padding masks are recomputed).
"""
from .rules import CLASSIFIER_HEAD, CLASSIFIER_NORM, fresh_norms, linear_weights

RULES = (
    *linear_weights(
        r"\.attn\.qkv",  # shared by the regional and the local attention
        r"\.attn\.proj",  # square (C, C): named here, never guessed from the shape
        r"\.mlp\.fc[12]",
        r"^head",
    ),
)

# regionvit_*_det from an ImageNet regionvit_* checkpoint: det_norm's inline norm0..3 are new.
FROM_CLASSIFIER = (
    CLASSIFIER_HEAD,
    CLASSIFIER_NORM,
    *fresh_norms(r"^norm[0-3]", "det_norm LayerNorm2d"),
)
