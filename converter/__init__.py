"""torch2paddle: convert official PyTorch checkpoints of vision backbones to PaddlePaddle and
prove the converted model computes the same function."""
from .api import convert, create_paddle_model, create_torch_model
from .errors import UserError
from .registry import MODELS, get_spec

__all__ = ["convert", "create_paddle_model", "create_torch_model", "UserError", "MODELS", "get_spec"]
__version__ = "0.1.0"
