"""Checkpoint input: every file format and container, prefixes, dtypes, entry selection;
output: loadable, atomic, deterministic."""
import numpy as np
import pytest
import torch

from converter import convert, create_paddle_model
from converter.api import load_pdparams
from converter.checkpoint import atomic_write, read_checkpoint
from converter.errors import UserError
from converter.fixtures import make_official_checkpoint
from converter.verify import run_verify

from conftest import file_sha256, load_manifest

NAME = "fcvit_tiny"


@pytest.fixture(scope="module")
def reference(official_checkpoint, tmp_path_factory):
    """The converted weights of a plain official checkpoint, to compare every other route with."""
    tmp = tmp_path_factory.mktemp("ref")
    convert(NAME, official_checkpoint(NAME), tmp / "ref.pdparams")
    return load_pdparams(tmp / "ref.pdparams")


def _assert_same_params(path, reference):
    got = load_pdparams(path)
    assert list(got) == list(reference)
    for k in reference:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


@pytest.mark.parametrize("container", ["raw", "model", "state_dict", "state_dict_ema", "model_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_containers_and_prefixes(container, prefix, tmp_path, reference):
    src = make_official_checkpoint(NAME, tmp_path / "in.pth", container=container, prefix=prefix)
    result = convert(NAME, src, tmp_path / "out.pdparams")
    assert result.checkpoint.entry == ("<raw>" if container == "raw" else container)
    assert result.checkpoint.stripped_prefixes == ([prefix] if prefix else [])
    _assert_same_params(tmp_path / "out.pdparams", reference)


@pytest.mark.parametrize("suffix", [".pth.tar", ".pt", ".bin", ".safetensors"])
def test_file_formats(suffix, tmp_path, reference):
    src = make_official_checkpoint(NAME, tmp_path / f"in{suffix}")
    convert(NAME, src, tmp_path / "out.pdparams")
    _assert_same_params(tmp_path / "out.pdparams", reference)


def test_parity_through_every_container_and_prefix(tmp_path):
    """The acceptance: logits within 1e-5 whatever container and prefix the weights came in."""
    for container, prefix in [("raw", "module."), ("state_dict_ema", "_orig_mod."), ("model_ema", "")]:
        src = make_official_checkpoint(NAME, tmp_path / f"{container}.pth", container=container, prefix=prefix)
        dst = tmp_path / f"{container}.pdparams"
        convert(NAME, src, dst, key=None if container in ("raw", "model") else container)
        report = run_verify(NAME, src, dst, key=None if container in ("raw", "model") else container)
        assert report.max_abs_err <= 1e-5, (container, prefix, report.max_abs_err)


def _two_entry_checkpoint(path):
    """A training checkpoint holding both weights and a (different) EMA copy, like BiFormer's."""
    make_official_checkpoint(NAME, path, container="state_dict", seed=1)
    plain = torch.load(path, weights_only=True)["state_dict"]
    make_official_checkpoint(NAME, path, container="state_dict", seed=2)
    ema = torch.load(path, weights_only=True)["state_dict"]
    torch.save({"state_dict": plain, "state_dict_ema": ema, "epoch": 300, "optimizer": {"lr": 0.1}}, path)
    return plain, ema


def test_default_entry_is_the_official_one_and_ema_is_selectable(tmp_path):
    plain, ema = _two_entry_checkpoint(tmp_path / "both.pth")
    default = read_checkpoint(tmp_path / "both.pth", ("state_dict", "model"))
    assert default.entry == "state_dict" and default.other_entries == ["state_dict_ema"]
    np.testing.assert_array_equal(default.state_dict["head.bias"], plain["head.bias"].numpy())
    chosen = read_checkpoint(tmp_path / "both.pth", ("state_dict", "model"), ema=True)
    assert chosen.entry == "state_dict_ema"
    np.testing.assert_array_equal(chosen.state_dict["head.bias"], ema["head.bias"].numpy())
    by_key = read_checkpoint(tmp_path / "both.pth", ("state_dict",), key="state_dict_ema")
    assert by_key.entry == "state_dict_ema"
    result = convert(NAME, tmp_path / "both.pth", tmp_path / "out.pdparams", ema=True)
    assert "state_dict_ema" in result.summary()


def test_missing_entry_is_a_clear_error(tmp_path):
    make_official_checkpoint(NAME, tmp_path / "m.pth", container="model")
    with pytest.raises(UserError, match="no state dict under 'nope'; entries holding one: model"):
        read_checkpoint(tmp_path / "m.pth", key="nope")
    with pytest.raises(UserError, match="no EMA weights"):
        read_checkpoint(tmp_path / "m.pth", ema=True)


def test_half_precision_is_converted_to_float32_unless_kept(tmp_path):
    src = make_official_checkpoint(NAME, tmp_path / "half.pth", half=True)
    result = convert(NAME, src, tmp_path / "f32.pdparams")
    floats = sum(e["dtype"] == "float32" for e in load_manifest(NAME)["state_dict"])
    assert result.checkpoint.upcast == {"float16": floats}  # every float tensor, BN statistics included
    assert {v.dtype for v in load_pdparams(tmp_path / "f32.pdparams").values()} == {np.dtype("float32")}
    convert(NAME, src, tmp_path / "f16.pdparams", keep_dtype=True)
    assert np.dtype("float16") in {v.dtype for v in load_pdparams(tmp_path / "f16.pdparams").values()}


def test_bfloat16_is_converted_to_float32(official_checkpoint, tmp_path):
    raw = torch.load(official_checkpoint(NAME, container="raw"))
    src = tmp_path / "bf16.pth"  # a new file: the session's cached checkpoint stays as it is
    torch.save({k: (v.bfloat16() if v.is_floating_point() else v) for k, v in raw.items()}, src)
    result = convert(NAME, src, tmp_path / "out.pdparams")
    assert "bfloat16" in result.checkpoint.upcast
    with pytest.raises(UserError, match="bfloat16"):
        convert(NAME, src, tmp_path / "kept.pdparams", keep_dtype=True)


def test_output_loads_strictly_into_the_paddle_model(official_checkpoint, tmp_path):
    convert(NAME, official_checkpoint(NAME), tmp_path / "out.pdparams")
    import paddle

    model = create_paddle_model(NAME)
    missing, unexpected = model.set_state_dict(paddle.load(str(tmp_path / "out.pdparams")))
    assert missing == [] and unexpected == []


def test_conversion_is_byte_identical(official_checkpoint, tmp_path):
    src = official_checkpoint(NAME)
    convert(NAME, src, tmp_path / "a.pdparams")
    convert(NAME, src, tmp_path / "b.pdparams")
    assert file_sha256(tmp_path / "a.pdparams") == file_sha256(tmp_path / "b.pdparams")


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    dst = tmp_path / "out.pdparams"

    def write(tmp):
        tmp.write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(dst, write)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(official_checkpoint, tmp_path):
    src = official_checkpoint(NAME)
    dst = tmp_path / "out.pdparams"
    dst.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists; pass --force"):
        convert(NAME, src, dst)
    assert dst.read_bytes() == b"precious"
    convert(NAME, src, dst, force=True)
    assert dst.read_bytes() != b"precious"


def test_other_class_count_with_allow_missing(official_checkpoint, tmp_path):
    src = official_checkpoint(NAME)
    with pytest.raises(UserError, match="shape mismatch"):
        convert(NAME, src, tmp_path / "x.pdparams", num_classes=10)
    result = convert(NAME, src, tmp_path / "x.pdparams", num_classes=10, allow_missing=["head.*"])
    assert sorted(result.report.allowed_missing) == ["head.bias", "head.weight"]
