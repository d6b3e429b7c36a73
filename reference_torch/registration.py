"""Registration of the reference factories with timm, where timm is installed.

timm is optional.  Nothing in torch2paddle needs it, and on a CPU-only machine it often cannot be
imported at all: timm imports torchvision, and the torchvision wheel on PyPI is built against the
CUDA build of torch (several GB of CUDA libraries), not the CPU one.  Where timm imports,
``timm.create_model('fcvit_b12')`` builds our reference, as it builds the official model.
"""
from __future__ import annotations

import functools
import warnings

# Keyword arguments timm.create_model passes to every entrypoint; our factories take none of them.
_TIMM_BOOKKEEPING_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm_register_model():
    try:
        from timm.models import register_model
    except ImportError:
        return None
    except Exception as err:  # installed but broken, e.g. torchvision built for another torch
        warnings.warn(f"timm is installed but does not import ({type(err).__name__}: {err}); "
                      "the reference models are not registered with timm", stacklevel=3)
        return None
    return register_model


_TIMM_REGISTER = _timm_register_model()


def register_model(factory):
    """Decorator: register ``factory`` with timm under its own name when timm is available.

    timm gets a wrapper that drops the bookkeeping keywords timm.create_model passes to every
    entrypoint; the factory itself is returned unchanged, for direct calls."""
    if _TIMM_REGISTER is not None:
        @functools.wraps(factory)
        def timm_entrypoint(*args, **kwargs):
            for key in _TIMM_BOOKKEEPING_KWARGS:
                kwargs.pop(key, None)
            return factory(*args, **kwargs)

        _TIMM_REGISTER(timm_entrypoint)
    return factory


def timm_registration_active() -> bool:
    return _TIMM_REGISTER is not None
