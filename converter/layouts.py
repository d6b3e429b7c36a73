"""The Paddle models' state-dict layouts -- every key and shape, in the model's order -- recorded.

``convert`` checks a checkpoint against the names and shapes of the Paddle model it is for.
Building the model to learn them, even as a ``paddle.LazyGuard`` skeleton with no weights,
imports Paddle's layer machinery and creates ~1,000-2,000 parameter descriptions: 0.1-0.3 s,
as long as copying a 200 MB checkpoint.  So each family's layouts for the default
configuration (1000 classes, the official input size) are recorded in
``paddle_models/layouts/<family>.json``, one line per key.  A test rebuilds every one from the
Paddle model and compares, key order included, so the records cannot drift from the code;
any other configuration is built.

    python -m converter.layouts     # rewrite the records from the Paddle models
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import paddle_models  # an empty package __init__: no Paddle import

from .registry import MODELS, ModelSpec

LAYOUT_DIR = Path(paddle_models.__file__).parent / "layouts"


def paddle_layout(spec: ModelSpec, num_classes: int = 1000, img_size: Optional[int] = None) -> dict:
    """Key -> shape of the Paddle model's state dict, in its order, without initialising weights."""
    if spec.factory_kwargs(num_classes, img_size) == spec.factory_kwargs():
        recorded = recorded_layouts(spec.family.name).get(spec.name)
        if recorded is not None:
            return dict(recorded)
    return built_layout(spec, num_classes, img_size)


def built_layout(spec: ModelSpec, num_classes: int = 1000, img_size: Optional[int] = None) -> dict:
    """The layout read off a weightless skeleton of the Paddle model."""
    model = paddle_skeleton(spec, num_classes, img_size)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def paddle_skeleton(spec: ModelSpec, num_classes: int = 1000, img_size: Optional[int] = None):
    """The Paddle model built under ``paddle.LazyGuard``: names and shapes, no weights initialised."""
    import paddle

    if not getattr(spec, "builds_lazily", True):  # pair files: others' models may not build under LazyGuard
        return spec.create_paddle(num_classes=num_classes, img_size=img_size)
    with paddle.LazyGuard():
        return spec.create_paddle(num_classes=num_classes, img_size=img_size)


@functools.lru_cache(maxsize=None)
def recorded_layouts(family: str) -> dict:
    """Variant -> layout, as recorded for ``family`` (empty if there is no record)."""
    path = LAYOUT_DIR / f"{family}.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return {name: {k: tuple(shape) for k, shape in layout.items()} for name, layout in json.load(f).items()}


def layout_file_text(layouts: dict) -> str:
    """JSON with one line per key, so a change to a model shows as a readable diff."""
    variants = []
    for name, layout in layouts.items():
        keys = ",\n".join(f"    {json.dumps(k)}: {json.dumps(list(shape))}" for k, shape in layout.items())
        variants.append(f"  {json.dumps(name)}: {{\n{keys}\n  }}")
    return "{\n" + ",\n".join(variants) + "\n}\n"


def record_all() -> list:
    """Rewrite every family's record from the Paddle models; returns the files written."""
    families: dict = {}
    for spec in MODELS.values():
        families.setdefault(spec.family.name, {})[spec.name] = built_layout(spec)
    LAYOUT_DIR.mkdir(exist_ok=True)
    written = []
    for family, layouts in families.items():
        path = LAYOUT_DIR / f"{family}.json"
        path.write_text(layout_file_text(layouts))
        written.append(path)
    recorded_layouts.cache_clear()
    return written


if __name__ == "__main__":
    for path in record_all():
        print(f"wrote {path}")
