"""The mapping engine applies declared rules only, and refuses anything it cannot account for."""
import numpy as np
import pytest

from converter.engine import MappingError, convert_state_dict, reverse_key, target_key
from mappings.rules import BATCHNORM, Drop, Transpose, linear_weights

RULES = (*BATCHNORM, *linear_weights(r"attn\.proj"))


def _source():
    rng = np.random.default_rng(0)
    return {
        "attn.proj.weight": rng.standard_normal((8, 8)).astype(np.float32),  # square Linear
        "attn.proj.bias": rng.standard_normal(8).astype(np.float32),
        "rel_pos": rng.standard_normal((8, 8)).astype(np.float32),  # square, but not a Linear
        "bn.weight": np.ones(4, np.float32),
        "bn.running_mean": np.zeros(4, np.float32),
        "bn.running_var": np.ones(4, np.float32),
        "bn.num_batches_tracked": np.array(7),
    }


TARGET = {"attn.proj.weight": (8, 8), "attn.proj.bias": (8,), "rel_pos": (8, 8),
          "bn.weight": (4,), "bn._mean": (4,), "bn._variance": (4,)}


def test_square_linear_is_transposed_by_rule_and_square_parameter_is_not():
    src = _source()
    out, report = convert_state_dict(src, RULES, TARGET)
    np.testing.assert_array_equal(out["attn.proj.weight"], src["attn.proj.weight"].T)
    np.testing.assert_array_equal(out["rel_pos"], src["rel_pos"])
    assert report.transposed == 1 and report.renamed == 2 and report.num_dropped == 1
    assert list(out) == list(TARGET)


def test_missing_unexpected_and_mismatched_keys_are_all_reported():
    src = _source()
    del src["bn.weight"]
    src["extra.weight"] = np.zeros(3, np.float32)
    src["attn.proj.bias"] = np.zeros(9, np.float32)
    with pytest.raises(MappingError) as info:
        convert_state_dict(src, RULES, TARGET)
    message = str(info.value)
    assert "missing (e.g. bn.weight)" in message
    assert "unexpected (e.g. extra.weight)" in message
    assert "shape mismatch (e.g. attn.proj.bias (9,)" in message
    assert len(info.value.details) == 3  # a mismatched key is not listed as missing as well
    assert "\n" not in message


def test_a_target_key_filled_twice_is_an_error():
    src = {"bn.running_mean": np.zeros(4, np.float32), "bn._mean": np.zeros(4, np.float32)}
    with pytest.raises(MappingError, match="filled twice"):
        convert_state_dict(src, RULES, {"bn._mean": (4,)})


def test_transpose_rule_on_a_non_matrix_is_an_error():
    with pytest.raises(MappingError, match="transpose rule on a non-2-D tensor"):
        convert_state_dict({"head.weight": np.zeros((2, 3, 4), np.float32)}, linear_weights("head"),
                           {"head.weight": (4, 3, 2)})


def test_drop_check_guards_dropped_tensors():
    expected = np.arange(4)
    rule = Drop(r"index$", "recomputed buffer",
                check=lambda key, a: None if np.array_equal(a, expected) else "differs from the recomputed table")
    convert_state_dict({"index": expected.copy()}, (rule,), {})
    with pytest.raises(MappingError, match="dropped-key check failed.*differs from the recomputed table"):
        convert_state_dict({"index": expected[::-1].copy()}, (rule,), {})


def test_allow_missing_relaxes_knowingly():
    src = _source()
    src["attn.proj.bias"] = np.zeros(9, np.float32)
    out, report = convert_state_dict(src, RULES, TARGET, allow_missing=["attn.proj.bias"])
    assert "attn.proj.bias" not in out and report.allowed_missing == ["attn.proj.bias"]


def test_keys_map_and_reverse_without_tensors():
    assert target_key("layers.0.bn.running_var", RULES) == "layers.0.bn._variance"
    assert target_key("layers.0.bn.num_batches_tracked", RULES) is None
    assert reverse_key("layers.0.bn._variance", RULES) == "layers.0.bn.running_var"
    assert reverse_key("layers.0.attn.proj.weight", RULES) == "layers.0.attn.proj.weight"


def test_rules_match_whole_names_not_substrings():
    rule = Transpose(r"(^|\.)head\.weight$")
    assert rule.matches("head.weight") and not rule.matches("subhead.weight")
