"""FCViT (ma-xu/FCViT): official state-dict keys -> Paddle keys."""
from .rules import BATCHNORM, CLASSIFIER_HEAD, CLASSIFIER_NORM, fresh_norms, linear_weights

RULES = (
    *BATCHNORM,  # patch_embed.norm and the three downsampling norms
    *linear_weights(
        r"token_mixer\.gc[12]\.fc[12]",  # GlobalContext compete bottleneck
        r"^head",
    ),
)

# fcvit_b*_feat from an ImageNet fcvit_b* checkpoint: the side-branch output norms are new.
FROM_CLASSIFIER = (
    CLASSIFIER_HEAD,
    CLASSIFIER_NORM,
    *fresh_norms(r"^norm[0246]", "dense output GroupNorm"),
)
