"""CrossFormer / CrossFormer++ (cheerss/CrossFormer): official state-dict keys -> Paddle keys.

No BatchNorm and no raw parameters: apart from the Linear transposes every key copies as is.
The dense backbones (``*_det``, ``*_seg``) have the classifier's keys minus ``norm`` / ``head`` and
no extra norms, so the same table serves them.
Checkpoints written by the release-era v1 code also carry each block's DPB index buffers
(``attn.biases``, ``attn.relative_position_index``; persistent there, non-persistent in the
current code and in both our models). They are dropped, but only after checking they hold
exactly the tables the models recompute; any other extra key is still an error.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from model_configs.crossformer import coordinate_table, relative_position_index

from .rules import CLASSIFIER_HEAD, CLASSIFIER_NORM, Drop, linear_weights


def _group_size(rows: int, cols: int) -> Optional[int]:
    """G of a ((2G-1)^2, 2) offset table or a (G^2, G^2) index table with this many rows."""
    side = int(round(rows ** 0.5))
    if side < 1 or side * side != rows:
        return None
    if cols == 2:  # offset table: side = 2G - 1
        return (side + 1) // 2 if side % 2 else None
    return side  # index table: side = G


def _check_table(value, build, square, dtype_kinds, dtype_name) -> Optional[str]:
    """None when ``value`` is exactly ``build(G)`` for the group size G its shape implies."""
    what = build.__name__
    shape = tuple(value.shape)
    fits = len(shape) == 2 and (shape[0] == shape[1] if square else shape[1] == 2)
    group_size = _group_size(shape[0], shape[1]) if fits else None
    if group_size is None:
        return f"legacy buffer has shape {shape}, which is no group size's {what}"
    if value.dtype.kind not in dtype_kinds:
        return f"legacy buffer has dtype {value.dtype}; the official {what} is {dtype_name}"
    expected = build(group_size)
    if not np.array_equal(value, expected):
        bad = int(np.count_nonzero(value != expected))
        return (f"legacy buffer differs from the {what} the model recomputes for group size {group_size} "
                f"({bad} of {value.size} values): not a CrossFormer checkpoint, or a corrupted one")
    return None


def check_legacy_biases(key: str, value: np.ndarray) -> Optional[str]:
    return _check_table(value, coordinate_table, square=False, dtype_kinds="f", dtype_name="float")


def check_legacy_index(key: str, value: np.ndarray) -> Optional[str]:
    return _check_table(value, relative_position_index, square=True, dtype_kinds="iu", dtype_name="int64")


RULES = (
    # v1 release checkpoints carry every block's DPB tables (persistent buffers in the release-era
    # code, non-persistent now): verified against the tables the model recomputes, then dropped.
    Drop(r"\.attn\.biases$", "v1 legacy DPB offset table, equal to the recomputed one",
         check=check_legacy_biases),
    Drop(r"\.attn\.relative_position_index$", "v1 legacy DPB index table, equal to the recomputed one",
         check=check_legacy_index),
    *linear_weights(
        r"\.attn\.qkv",
        r"\.attn\.proj",  # square (C, C)
        r"\.attn\.pos\.pos_proj",  # DPB input Linear(2, C/16)
        r"\.attn\.pos\.pos[123]\.2",  # DPB Sequential(LN, ReLU, Linear); pos1/pos2 are square
        r"\.mlp\.fc[12]",
        r"^head",
    ),
)

# A dense backbone from an ImageNet classification checkpoint (e.g. crossformer_small ->
# crossformer_small_det, crossformer_pp_small -> crossformer_pp_small_det): the classifier's final
# norm and head have no place in it; it adds no norms of its own.  v1 checkpoints' DPB tables are
# checked and dropped by RULES as for the classifier.
FROM_CLASSIFIER = (CLASSIFIER_HEAD, CLASSIFIER_NORM)
