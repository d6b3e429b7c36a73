"""Optional dependencies.  The base install (Paddle, numpy, click, safetensors) converts and
lists models without PyTorch; commands that run the PyTorch reference need the ``verify``
extra, and say so in one line when it is missing."""
from __future__ import annotations

import importlib

from .errors import UserError

VERIFY_EXTRA = "pip install 'torch2paddle[verify]'"


def require_torch(what: str):
    """Import and return torch for ``what``, or raise a UserError naming the command that installs it."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise UserError(f"{what} needs torch, which the base install leaves out: {VERIFY_EXTRA}") from None
