"""The torch references reproduce the official state-dict layout exactly, and the mapping
tables agree with the models about which tensors are Linear weights."""
import pytest

from converter.engine import target_key
from converter.layouts import paddle_layout
from converter.registry import MODELS
from mappings.rules import Transpose

from conftest import has_manifest, load_manifest

# Every model with an official layout on record (three of the six RegionViT detectors have none;
# tests/test_dense_regionvit.py derives theirs from the official code).
NAMES = [name for name in MODELS if has_manifest(name)]
CLASSIFIERS = [name for name in NAMES if not MODELS[name].dense]
DENSE = [name for name in NAMES if MODELS[name].dense]


@pytest.fixture(scope="module")
def torch_models():
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()  # keep at most one big model alive
            cache[name] = MODELS[name].create_torch()
        return cache[name]
    return get


@pytest.mark.parametrize("name", NAMES, scope="module")  # grouped by model: each built once
def test_reference_state_dict_equals_manifest(name, torch_models):
    manifest = load_manifest(name)
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in torch_models(name).state_dict().items()]
    expected = [(e["key"], e["shape"], e["dtype"]) for e in manifest["state_dict"]]
    assert sorted(got) == sorted(expected)
    assert len(got) == manifest["num_state_dict_entries"]


@pytest.mark.parametrize("name", NAMES, scope="module")  # grouped by model: each built once
def test_parameter_count_equals_manifest(name, torch_models):
    model = torch_models(name)
    assert sum(p.numel() for p in model.parameters()) == load_manifest(name)["num_parameters"]


@pytest.mark.parametrize("name", NAMES, scope="module")  # grouped by model: each built once
def test_transpose_rules_cover_exactly_the_linear_weights(name, torch_models):
    """The table names Linear weights; the model's nn.Linear modules and the manifest's
    'linear_weight' marks must be exactly the keys a Transpose rule matches."""
    import torch

    rules = MODELS[name].rules
    transposes = [r for r in rules if isinstance(r, Transpose)]
    model = torch_models(name)
    keys = list(model.state_dict())
    by_rule = {k for k in keys if any(t.matches(k) for t in transposes)}
    # remove_duplicate=False: a shared module (RegionViT proj/proj_cls) is listed under every name
    by_model = {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, torch.nn.Linear)}
    by_manifest = {e["key"] for e in load_manifest(name)["state_dict"] if e["kind"] == "linear_weight"}
    assert by_rule == by_manifest
    assert by_model == by_manifest


@pytest.mark.parametrize("name", NAMES)
def test_every_official_key_is_mapped_or_dropped_by_a_rule(name):
    """Without tensors: the table alone sends every official key to a Paddle key of the model
    (its recorded layout, which tests/test_layouts.py holds to the model's own)."""
    paddle_keys = set(paddle_layout(MODELS[name]))
    mapped = {target_key(e["key"], MODELS[name].rules) for e in load_manifest(name)["state_dict"]}
    mapped.discard(None)
    assert mapped == paddle_keys


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_registry_preprocessing_matches_official(name):
    official = load_manifest(name)["eval_preprocessing"]
    pre = MODELS[name].preprocessing
    assert pre.resize_shorter_side == official["resize_shorter_side"]
    assert pre.input_size == official["center_crop"]
    assert pre.interpolation == official["interpolation"]
    assert list(pre.mean) == official["mean"] and list(pre.std) == official["std"]


@pytest.mark.parametrize("name", DENSE)
def test_registry_dense_description_matches_official(name):
    """Output channels and strides, the prefix inside the released detector/segmentor file, and
    the official commit the registry says the model reproduces."""
    manifest = load_manifest(name)
    dense = MODELS[name].dense
    assert list(dense.channels) == manifest["dense"]["out_channels"]
    assert list(dense.strides) == manifest["dense"]["strides"]
    assert dense.checkpoint_prefix == manifest["checkpoint_prefix"]
    assert manifest["commit"].startswith(dense.source.split("@")[1].split()[0])
