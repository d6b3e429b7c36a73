"""convert --reverse: Paddle weights back into an official-format PyTorch checkpoint by the same
mapping table; torch -> Paddle -> torch returns every tensor bit for bit (one variant per family)."""
import numpy as np
import pytest
import torch

from converter import create_torch_model
from converter.engine import MappingError, reverse_state_dict
from converter.registry import get_spec
from mappings.rules import BATCHNORM, linear_weights

from conftest import ONE_PER_FAMILY, assert_one_line_error, cli

STEP_COUNTER = "num_batches_tracked"


def official_with_step_counts(official_checkpoint, name, path):
    """The seeded official checkpoint, with BatchNorm step counters a real training run would
    leave (non-zero), so the test sees what the round trip does with them."""
    entry = get_spec(name).family.checkpoint_entries[0]
    state = torch.load(official_checkpoint(name), weights_only=True)[entry]
    for key in state:
        if key.endswith(STEP_COUNTER):
            state[key] = torch.tensor(1234)
    torch.save({entry: state}, path)
    return state


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_torch_paddle_torch_round_trip_is_bit_exact(name, official_checkpoint, tmp_path, capsys):
    original = official_with_step_counts(official_checkpoint, name, tmp_path / "original.pth")
    code, _, err = cli(capsys, "convert", name, tmp_path / "original.pth", tmp_path / "w.pdparams")
    assert code == 0, err
    code, out, err = cli(capsys, "convert", "--reverse", name, tmp_path / "w.pdparams", tmp_path / "back.pth")
    assert code == 0, err
    assert "converted back" in out

    entry = get_spec(name).family.checkpoint_entries[0]
    saved = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(saved) == [entry]
    back = saved[entry]
    assert list(back) == list(original)  # the official key order
    for key, tensor in original.items():
        if key.endswith(STEP_COUNTER):
            # Paddle keeps no step counter: written as a fresh reference holds it.
            assert back[key].dtype == torch.int64 and int(back[key]) == 0
        else:
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    create_torch_model(name, tmp_path / "back.pth")  # loads strictly into the reference

    # And back again: the same .pdparams, byte for byte.
    code, _, err = cli(capsys, "convert", name, tmp_path / "back.pth", tmp_path / "again.pdparams")
    assert code == 0, err
    assert (tmp_path / "again.pdparams").read_bytes() == (tmp_path / "w.pdparams").read_bytes()


RULES = (*BATCHNORM, *linear_weights(r"attn\.proj"))
REFERENCE = {"attn.proj.weight": (8, 8), "rel_pos": (8, 8), "bn.running_mean": (4,),
             "bn.num_batches_tracked": ()}


def test_the_table_read_backwards():
    rng = np.random.default_rng(0)
    params = {"attn.proj.weight": rng.standard_normal((8, 8)).astype(np.float32),
              "rel_pos": rng.standard_normal((8, 8)).astype(np.float32),
              "bn._mean": rng.standard_normal(4).astype(np.float32)}
    state, recreated, report = reverse_state_dict(params, RULES, REFERENCE)
    np.testing.assert_array_equal(state["attn.proj.weight"], params["attn.proj.weight"].T)  # square, by rule
    np.testing.assert_array_equal(state["rel_pos"], params["rel_pos"])  # square, not a Linear
    np.testing.assert_array_equal(state["bn.running_mean"], params["bn._mean"])
    assert recreated == ["bn.num_batches_tracked"]
    assert report.transposed == 1 and report.renamed == 1 and list(state) == list(REFERENCE)[:3]


def test_weights_that_do_not_fit_are_all_reported():
    params = {"attn.proj.weight": np.zeros((8, 4), np.float32), "bn.running_mean": np.zeros(4, np.float32),
              "extra": np.zeros(2, np.float32)}
    with pytest.raises(MappingError) as info:
        reverse_state_dict(params, RULES, REFERENCE)
    message = str(info.value)
    assert "2 missing (e.g. rel_pos)" in message and "bn._mean" in info.value.details[0]  # as Paddle keys
    assert "unexpected (e.g. bn.running_mean)" in message  # a torch name where a Paddle one belongs
    assert "shape mismatch (e.g. attn.proj.weight (4, 8) -> attn.proj.weight expects (8, 8))" in message


def test_reverse_errors(official_checkpoint, tmp_path, capsys):
    params = tmp_path / "w.pdparams"
    code, _, err = cli(capsys, "convert", "fcvit_tiny", official_checkpoint("fcvit_tiny"), params)
    assert code == 0, err
    code, _, err = cli(capsys, "convert", "--reverse", "fcvit_b12", params, tmp_path / "b12.pth")
    assert_one_line_error(code, err, "Paddle weights do not match the torch reference", "shape mismatch")
    code, _, err = cli(capsys, "convert", "--reverse", "--ema", "fcvit_tiny", params, tmp_path / "x.pth")
    assert_one_line_error(code, err, "--ema apply to reading PyTorch checkpoints, not to --reverse")
    code, _, err = cli(capsys, "convert", "--reverse", "fcvit_tiny", params, tmp_path / "x.safetensors")
    assert_one_line_error(code, err, "use a .pth path")
    (tmp_path / "taken.pth").write_bytes(b"keep")
    code, _, err = cli(capsys, "convert", "--reverse", "fcvit_tiny", params, tmp_path / "taken.pth")
    assert_one_line_error(code, err, "already exists; pass --force")
    assert (tmp_path / "taken.pth").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pth", "w.pdparams"]
