"""The official eval transform, computed once per image and fed identically to both frameworks:
resize the shorter side to floor(size / crop_pct) with PIL (bicubic, antialiased as PIL does),
center-crop, scale to [0, 1], normalise.  Same arithmetic as timm's / torchvision's eval
transform on PIL images."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .registry import EvalPreprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _pil_filter(name: str):
    from PIL import Image

    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}[name]


def resize_shorter_side(img, size: int, interpolation: str):
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), _pil_filter(interpolation))


def center_crop(img, size: int):
    w, h = img.size
    if w < size or h < size:  # torchvision pads; resizing first makes this unreachable for eval
        raise UserError(f"image {w}x{h} is smaller than the {size} crop")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def crop_uint8(img, pre: EvalPreprocessing, input_size: int = None) -> np.ndarray:
    """HWC uint8 after resize and crop (the part a PIL pipeline rounds to gray levels)."""
    size = input_size or pre.input_size
    resize = int(np.floor(size / pre.crop_pct))
    img = resize_shorter_side(img.convert("RGB"), resize, pre.interpolation)
    return np.asarray(center_crop(img, size), dtype=np.uint8)


def normalize(hwc_uint8: np.ndarray, pre: EvalPreprocessing) -> np.ndarray:
    x = hwc_uint8.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def load_image(path, pre: EvalPreprocessing, input_size: int = None) -> np.ndarray:
    """One image file -> CHW float32, as the official eval pipeline feeds it."""
    from PIL import Image

    with Image.open(path) as img:
        return normalize(crop_uint8(img, pre, input_size), pre)


def load_image_resized(path, pre: EvalPreprocessing, size: tuple) -> np.ndarray:
    """One image file -> CHW float32 resized to exactly (H, W) (bilinear, as a detector's test
    pipeline resizes, without its keep-ratio padding), normalised with ``pre``'s mean/std."""
    from PIL import Image

    h, w = size
    with Image.open(path) as img:
        return normalize(np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.uint8), pre)


def image_files(directory) -> list:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory of images")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{directory}: no image files found")
    return files
