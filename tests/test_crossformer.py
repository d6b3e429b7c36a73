"""CrossFormer / CrossFormer++ specifics: models built for another input size, the v1 legacy
index buffers (checked, then dropped), and sizes the models cannot be built for."""
import functools

import numpy as np
import pytest
import torch

from converter import convert
from converter.engine import MappingError
from converter.errors import UserError
from converter.registry import get_spec
from converter.verify import run_verify

from conftest import MAX_ABS_ERR, load_manifest


@pytest.mark.parametrize("name", ["crossformer_tiny", "crossformer_pp_small"])
def test_parity_when_built_for_384(name, official_checkpoint, tmp_path):
    """Built for 384, every stage groups, pads and masks differently than at 224 (see below)."""
    src = official_checkpoint(name)  # the weights do not depend on the input size
    dst = tmp_path / f"{name}-384.pdparams"
    convert(name, src, dst, img_size=384)
    report = run_verify(name, src, dst, batch_size=2, input_size=384, max_err=MAX_ABS_ERR)
    assert report.input_size == 384
    assert report.max_abs_err <= MAX_ABS_ERR, report.format()
    assert report.top1_agreement == 1.0


def _layout(name, size):
    """(group size, LDA?, mask shape) of the first two blocks of every stage."""
    model = get_spec(name).create_torch(img_size=size)
    return [[(b.layout.group_size, b.layout.lsda_flag, None if b.attn_mask is None else tuple(b.attn_mask.shape))
             for b in layer.blocks[:2]] for layer in model.layers]


def test_groups_padding_and_masks_follow_the_resolution():
    """As the official code derives them: a group as large as the map means global SDA; maps
    that G (SDA) or G*I (LDA) does not divide are padded, and the padded keys masked."""
    sda, lda = (7, 0, None), (7, 1, None)
    assert _layout("crossformer_small", 224) == [[sda, lda], [sda, lda], [sda, lda], [sda, sda]]
    assert _layout("crossformer_small", 384) == [
        [(7, 0, (196, 49, 49)), (7, 1, (256, 49, 49))],  # 96 -> 98 (SDA); 96 -> 112, 2x2 regions of I=8 (LDA)
        [(7, 0, (49, 49, 49)), (7, 1, (64, 49, 49))],
        [(7, 0, (16, 49, 49)), (7, 1, (16, 49, 49))],
        [(7, 0, (4, 49, 49)), (7, 1, (4, 49, 49))],  # 12 > 7: no longer global
    ]
    assert _layout("crossformer_pp_small", 224) == [
        [(4, 0, None), (4, 1, (256, 16, 16))],  # LDA pads 56 -> 64
        [(4, 0, None), (4, 1, (64, 16, 16))],
        [(14, 0, None), (14, 0, None)],  # whole 14x14 map
        [(7, 0, None), (7, 0, None)],
    ]
    assert _layout("crossformer_pp_small", 384) == [
        [(4, 0, None), (4, 1, None)],  # 96 divides by G*I = 16
        [(4, 0, None), (4, 1, None)],
        [(14, 0, (4, 196, 196)), (14, 1, (4, 196, 196))],  # 24 -> 28
        [(7, 0, (4, 49, 49)), (7, 1, (4, 49, 49))],
    ]


@pytest.mark.parametrize("name", ["crossformer_small", "crossformer_pp_small"])
@pytest.mark.parametrize("size", [224, 384])
def test_paddle_recomputes_the_same_index_tables_and_masks(name, size):
    """The discrete parts (DPB offsets, index tables, padding masks) must agree exactly, not
    just closely: one wrong index or mask entry moves a single group, not the whole output."""
    spec = get_spec(name)
    torch_buffers = dict(spec.create_torch(img_size=size).named_buffers())
    paddle_buffers = dict(spec.create_paddle(img_size=size).named_buffers())
    assert torch_buffers.keys() == paddle_buffers.keys()
    for key, t in torch_buffers.items():
        p = paddle_buffers[key].numpy()
        assert p.dtype == t.numpy().dtype, key
        np.testing.assert_array_equal(p, t.numpy(), err_msg=key)


# ----------------------------------------------------------------------------- legacy buffers

LEGACY_VARIANT = "crossformer_tiny"


@functools.cache
def _cached_legacy_state_dict():
    """What the release-era v1 code saved: the state dict plus every block's DPB tables, taken
    from the torch reference's own (non-persistent) buffers.  Built once; no test changes a
    tensor in place."""
    from converter.fixtures import randomize_

    model = randomize_(get_spec(LEGACY_VARIANT).create_torch(), seed=3)
    state = dict(model.state_dict())
    for key, buf in model.named_buffers():
        if key.endswith(("attn.biases", "attn.relative_position_index")):
            state[key] = buf.clone()
    return state


def _legacy_state_dict():
    """A copy of the cached dict, for the caller to replace or add entries in."""
    return dict(_cached_legacy_state_dict())


@pytest.fixture(scope="module", autouse=True)
def _free_the_legacy_state_dict():
    """The cached crossformer_tiny weights are ~110 MB: not kept beyond this module."""
    yield
    _cached_legacy_state_dict.cache_clear()


def _save(state, path):
    torch.save({"model": state, "epoch": 300}, path)
    return path


def test_legacy_buffers_are_the_ones_release_checkpoints_carry():
    manifest = load_manifest(LEGACY_VARIANT)
    state = _legacy_state_dict()
    extra = set(state) - {e["key"] for e in manifest["state_dict"]}
    legacy = manifest["legacy_checkpoint"]["extra_keys"]
    assert sorted(extra) == sorted(e["key"] for e in legacy)
    for e in legacy:
        assert list(state[e["key"]].shape) == e["shape"]
        assert str(state[e["key"]].dtype) == f"torch.{e['dtype']}"


def test_checkpoint_with_correct_legacy_buffers_converts(tmp_path):
    state = _legacy_state_dict()
    clean = {k: v for k, v in state.items() if not k.endswith(("attn.biases", "attn.relative_position_index"))}
    with_legacy = convert(LEGACY_VARIANT, _save(state, tmp_path / "v1.pth"), None)
    without = convert(LEGACY_VARIANT, _save(clean, tmp_path / "clean.pth"), None)
    assert with_legacy.report.num_dropped == len(state) - len(clean) == 32
    assert list(with_legacy.state_dict) == list(without.state_dict)
    for key, value in without.state_dict.items():
        np.testing.assert_array_equal(with_legacy.state_dict[key], value)
    # and the torch side loads the same file strictly (legacy keys set aside by the same rules)
    report = run_verify(LEGACY_VARIANT, tmp_path / "v1.pth", batch_size=1, max_err=MAX_ABS_ERR)
    assert report.passed, report.format()


@pytest.mark.parametrize("key, tamper, fragment", [
    ("layers.2.blocks.3.attn.relative_position_index", lambda t: t.flip(0), "differs from the relative_position_index"),
    ("layers.0.blocks.0.attn.biases", lambda t: t + 0.5, "differs from the coordinate_table"),
    ("layers.1.blocks.0.attn.biases", lambda t: t[:, [1, 0]], "differs from the coordinate_table"),  # dw-major
    ("layers.3.blocks.1.attn.relative_position_index", lambda t: t.float(), "dtype float32"),
    ("layers.3.blocks.2.attn.biases", lambda t: t[:-1], "shape (168, 2)"),
])
def test_tampered_legacy_buffer_fails_with_a_clear_message(tmp_path, key, tamper, fragment):
    state = _legacy_state_dict()
    state[key] = tamper(state[key])
    with pytest.raises(MappingError) as info:
        convert(LEGACY_VARIANT, _save(state, tmp_path / "tampered.pth"), None)
    message = str(info.value)
    assert "1 dropped-key check failed" in message and key in message and fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize("extra", ["layers.0.blocks.0.attn.attn_mask", "layers.0.blocks.0.attn_mask",
                                   "layers.0.blocks.0.attn.relative_position_bias_table"])
def test_unknown_extra_key_still_fails(tmp_path, extra):
    state = _legacy_state_dict()
    state[extra] = torch.zeros(3)
    with pytest.raises(MappingError, match=f"1 unexpected \\(e.g. {extra}\\)"):
        convert(LEGACY_VARIANT, _save(state, tmp_path / "extra.pth"), None)


# ----------------------------------------------------------------------------- impossible sizes

@pytest.mark.parametrize("size", [226, 200, 16, 0])
def test_model_constructors_reject_impossible_img_size(size):
    from paddle_models import crossformer as paddle_crossformer
    from reference_torch import crossformer as torch_crossformer

    for factory in (torch_crossformer.crossformer_small, paddle_crossformer.crossformer_pp_small):
        with pytest.raises(ValueError, match=f"cannot be built for img_size={size}: .* not a positive multiple of 32"):
            factory(img_size=size)


@pytest.mark.parametrize("h, w, fragment", [(226, 226, "not a positive multiple of 32"), (224, 256, "not square")])
def test_registry_rejects_impossible_input_size(h, w, fragment):
    with pytest.raises(UserError, match=f"crossformer_base: input {h}x{w} is {fragment}"):
        get_spec("crossformer_base").check_input_size(h, w)


def test_verify_rejects_impossible_input_size_before_building(official_checkpoint):
    with pytest.raises(UserError, match="input 300x300 is not a positive multiple of 32"):
        run_verify("crossformer_tiny", official_checkpoint("crossformer_tiny"), input_size=300)


def test_model_built_for_one_size_rejects_another_input():
    model = get_spec("crossformer_tiny").create_torch(img_size=256)
    with pytest.raises(ValueError, match=r"input 224x224 does not match .* \(256x256\); rebuild it with img_size=224"):
        model(torch.zeros(1, 3, 224, 224))
