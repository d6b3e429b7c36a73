"""Labelled image sets for ``eval``: the two layouts users have, and reading one image without
letting a bad file stop a 50,000-image run.

Layouts:

* an ImageNet-style folder ``ROOT/<class>/**/<image>``: one class per top-level sub-folder,
  class index = position of the folder name in sorted order (torchvision's ``ImageFolder``;
  timm's natural sort gives the same order for ImageNet's fixed-width wnids), images in sorted
  order beneath each class folder;
* a root plus a list file of ``relative/path label`` lines (PaddleClas' ``val_list.txt``);
  blank lines and ``#`` comments are ignored, the label is the last field so paths may
  contain spaces.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError, one_line
from .preprocess import IMAGE_SUFFIXES, load_image
from .registry import EvalPreprocessing


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Dataset:
    samples: list
    num_classes: int  # labels lie in [0, num_classes)
    description: str

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, limit: Optional[int]) -> "Dataset":
        """``limit`` samples spread evenly over the whole set (so a quick run on an ImageNet
        folder still sees every class), always the same ones."""
        n = len(self.samples)
        if limit is None or limit >= n:
            return self
        picked = [self.samples[i * n // limit] for i in range(limit)]
        return Dataset(picked, self.num_classes, f"{self.description}, {limit} of {n} images (--limit)")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _images_under(folder: Path) -> list:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if _is_image(f)]
    return found


def image_folder(root) -> Dataset:
    """An ImageNet-style ``ROOT/<class>/<image>`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        loose = "it holds images directly; " if any(_is_image(p.name) for p in root.iterdir()) else ""
        raise UserError(f"{root}: no class sub-folders ({loose}expected {root}/<class>/<image>, "
                        f"or pass --list FILE with 'relative/path label' lines)")
    samples = [Sample(path, label) for label, name in enumerate(classes) for path in _images_under(root / name)]
    if not samples:
        raise UserError(f"{root}: {len(classes)} class folders but no image files "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return Dataset(samples, len(classes), f"{root} (image folder, {len(classes)} classes)")


def _parse_list_line(line: str, where: str) -> tuple:
    fields = line.rsplit(None, 1)
    if len(fields) != 2:
        raise UserError(f"{where}: expected 'relative/path label', got {line.strip()[:80]!r}")
    path, label = fields
    try:
        value = int(label)
    except ValueError:
        raise UserError(f"{where}: label {label!r} is not an integer") from None
    if value < 0:
        raise UserError(f"{where}: label {value} is negative")
    return path, value


def list_file(root, list_path) -> Dataset:
    """Images named relative to ``root`` with integer labels, one ``path label`` per line."""
    root, list_path = Path(root), Path(list_path)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    if not list_path.is_file():
        raise UserError(f"{list_path}: no such list file")
    try:
        lines = list_path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{list_path}: not a text file of 'relative/path label' lines") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, label = _parse_list_line(line, f"{list_path}:{number}")
        samples.append(Sample(root / path, label))
    if not samples:
        raise UserError(f"{list_path}: no 'relative/path label' lines")
    num_classes = max(s.label for s in samples) + 1
    return Dataset(samples, num_classes, f"{list_path} (list file, root {root})")


def open_dataset(data, list_path=None, limit: Optional[int] = None) -> Dataset:
    """``data`` is an image folder, or the root for ``list_path``; a list file passed as ``data``
    takes its own folder as the root."""
    data = Path(data)
    if list_path is not None:
        dataset = list_file(data, list_path)
    elif data.is_file():
        dataset = list_file(data.parent, data)
    else:
        dataset = image_folder(data)
    return dataset.subset(limit)


# What PIL raises for a file it cannot decode: unknown format, truncated data, a broken PNG
# chunk, a decompression bomb; our own crop raises UserError.  A missing file is OSError.
@functools.lru_cache(maxsize=None)
def _unreadable_errors() -> tuple:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, UserError)


@dataclass
class Unreadable:
    path: Path
    reason: str


def read_sample(sample: Sample, pre: EvalPreprocessing):
    """(CHW float32 image, None), or (None, Unreadable) for a file that cannot be decoded."""
    try:
        return load_image(sample.path, pre), None
    except _unreadable_errors() as exc:
        reason = one_line(str(exc), 120) or type(exc).__name__
        return None, Unreadable(sample.path, reason)
