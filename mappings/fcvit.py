"""FCViT (ma-xu/FCViT): official state-dict keys -> Paddle keys."""
from .rules import BATCHNORM, linear_weights

RULES = (
    *BATCHNORM,  # patch_embed.norm and the three downsampling norms
    *linear_weights(
        r"token_mixer\.gc[12]\.fc[12]",  # GlobalContext compete bottleneck
        r"^head",
    ),
)
