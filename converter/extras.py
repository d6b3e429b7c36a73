"""Optional dependencies.  The base install (Paddle, numpy, click, safetensors) converts and
lists models without PyTorch; commands that run the PyTorch reference need the ``verify``
extra, and say so in one line when it is missing."""
from __future__ import annotations

import importlib
import os

from .errors import UserError

def require(module: str, what: str, extra: str):
    """Import and return ``module`` for ``what``, or raise a UserError naming the pip command
    that installs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs {module}, which the base install leaves out: "
                        f"pip install 'torch2paddle[{extra}]'") from None


def require_torch(what: str):
    """Import and return torch for ``what``, or raise a UserError naming the command that installs it."""
    return require("torch", what, "verify")


def same_threads_for_both_frameworks(torch) -> None:
    """Paddle pins itself to one CPU thread at import unless OMP_NUM_THREADS is set, while torch
    uses every core: give Paddle torch's count, so speed figures compare like with like.  Set
    through Paddle's API after import: setting OMP_NUM_THREADS before it makes Paddle print a
    two-line warning on import.  A user's own OMP_NUM_THREADS holds for both."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import paddle

    from paddle_models import native

    paddle.base.core.set_num_threads(torch.get_num_threads())
    native.set_threads(torch.get_num_threads())
