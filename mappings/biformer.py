"""BiFormer (rayleizhu/BiFormer): official state-dict keys -> Paddle keys.

Everything not named here is copied as is: convs (stem, downsampling, pos_embed, LePE),
LayerNorms (the dense backbones' ``extra_norms.{0..3}`` too: timm LayerNorm2d, weight/bias (C,)).
There are no raw parameters (the layer scales gamma1 / gamma2 exist only when a config sets
layer_scale_init_value > 0, which no official variant does; they would copy as is) and no persistent
buffers besides BatchNorm's.  The dense backbones
(biformer_*_det / *_seg) use ``RULES``: their keys are the classifier's less ``head`` and ``norm``.

biformer_stl and biformer_stl_nchw use the same key names for different module types
(``stages.3.blocks.0.attn.qkv.weight`` and ``mlp.{0,2}`` are Linears in one, 1x1 convs in the
other), so no name-based table fits both: biformer_stl_nchw has its own, in ``VARIANT_RULES``.
"""
from .rules import BATCHNORM, CLASSIFIER_HEAD, CLASSIFIER_NORM, fresh_norms, linear_weights

# biformer_tiny / small / base and biformer_stl (NHWC blocks with Linear projections).
RULES = (
    *BATCHNORM,  # stem / downsampling BatchNorms and the final ``norm`` (a BatchNorm2d, not a LayerNorm)
    *linear_weights(
        r"\.attn\.qkv(\.qkv)?",  # BRA QKVLinear (nested ``qkv.qkv``) and the stage-4 AttentionLePE qkv
        r"\.attn\.(wo|proj)",  # output projections: square (C, C), so named here, never guessed from a shape
        r"\.mlp\.[023]",  # MLP Linears: mlp.0 / mlp.3 (main; mlp.1 Identity, mlp.2 GELU) or mlp.0 / mlp.2 (stl)
        r"^head",
    ),
)

# biformer_stl_nchw: every projection (qkv_linear, output_linear, qkv, proj, mlp) is a 1x1 conv.
RULES_NCHW = (
    *BATCHNORM,  # stem / merging BatchNorms and the final ``norm``
    *linear_weights(r"^head"),  # the only nn.Linear
)

VARIANT_RULES = {"biformer_stl_nchw": RULES_NCHW}

# biformer_*_det / *_seg from an ImageNet biformer_small / base checkpoint, as the official dense
# training starts (slurm_train.sh: model.pretrained=<checkpoint>, loaded by mmcv_custom
# load_checkpoint with strict=False): the head and the final BatchNorm are dropped; the side-branch
# output norms are new, weight 1 / bias 0 as the official _init_weights sets every LayerNorm.
FROM_CLASSIFIER = (
    CLASSIFIER_HEAD,
    CLASSIFIER_NORM,
    *fresh_norms(r"^extra_norms\.[0-3]", "dense output LayerNorm2d"),
)
