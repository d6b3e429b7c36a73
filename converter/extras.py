"""Optional dependencies.  The base install (Paddle, numpy, click, safetensors) converts and
lists models without PyTorch; commands that run the PyTorch reference need the ``verify``
extra, and say so in one line when it is missing."""
from __future__ import annotations

import importlib

from .errors import UserError

VERIFY_EXTRA = "pip install 'torch2paddle[verify]'"


def require_torch(what: str, modules: tuple = ("torch", "timm")):
    """Import ``modules`` (torch first) for ``what``; return torch, or raise a UserError naming
    the command that installs them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{what} needs {' and '.join(missing)}, which the base install leaves out: {VERIFY_EXTRA}")
    return importlib.import_module("torch")
