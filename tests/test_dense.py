"""Dense-prediction backbones through the one engine, registry and CLI: released detector /
segmentor files (neck and head keys beside the backbone) and ImageNet classification checkpoints
convert; Paddle features equal the reference's at non-square sizes that need padding; bad input
is one line.  Family-specific numerics (padding, masks, v1 vs HEAD) are in test_dense_<family>.py."""
import numpy as np
import pytest
import torch

from converter import convert, create_torch_model
from converter.fixtures import DETECTOR_HEADS, make_official_checkpoint
from converter.registry import DENSE_VERIFY_SIZES, MODELS, get_spec
from converter.verify import run_verify

from conftest import MAX_ABS_ERR, assert_no_output, assert_one_line_error, cli

DENSE = [name for name, spec in MODELS.items() if spec.dense]


def test_every_family_has_dense_backbones():
    assert {MODELS[name].family.name for name in DENSE} == {"fcvit", "biformer", "crossformer", "regionvit"}


@pytest.mark.parametrize("name", DENSE)
def test_released_detector_file_converts_and_matches_reference(name, tmp_path):
    """Seeded official-format detector/segmentor file -> convert -> features at two non-square
    sizes: every stage within 1e-5 x max(1, max |feature|)."""
    src = make_official_checkpoint(name, tmp_path / f"{name}.pth")
    result = convert(name, src, tmp_path / f"{name}.pdparams")
    spec = get_spec(name)
    assert result.checkpoint.backbone_prefix == spec.dense.checkpoint_prefix
    heads = DETECTOR_HEADS[spec.dense.detector](spec.dense.channels)
    assert sum(result.checkpoint.left_out.values()) == len(heads)  # every neck / head key, none of the backbone's
    report = run_verify(name, src, tmp_path / f"{name}.pdparams", batch_size=1, max_err=MAX_ABS_ERR)
    assert report.passed, report.format()
    assert report.top1_agreement is None
    assert {f["size"] for f in report.features} == {f"{h}x{w}" for h, w in DENSE_VERIFY_SIZES}
    assert len(report.features) == 2 * len(spec.dense.channels)
    for f in report.features:
        assert f["channels"] == spec.dense.channels[f["stage"] - 1]  # stages 1..4
        assert f["max_abs_err"] <= MAX_ABS_ERR * max(1.0, f["scale"]), f


@pytest.mark.parametrize("name", DENSE)
def test_feature_maps_have_the_declared_channels_and_strides(name):
    spec = get_spec(name)
    model = spec.create_torch(out_indices=(1, 3))
    assert model.feature_info == [{"channels": spec.dense.channels[i], "stride": spec.dense.strides[i]}
                                  for i in (1, 3)]
    h, w = 320, 448
    with torch.no_grad():
        maps = model.eval()(torch.randn(1, 3, h, w))
    assert [tuple(m.shape) for m in maps] == [(1, spec.dense.channels[i], h // s, w // s)
                                             for i, s in ((1, 8), (3, 32))]


def test_summary_reports_what_the_detector_file_held_besides_the_backbone(official_checkpoint, tmp_path, capsys):
    code, out, err = cli(capsys, "convert", "fcvit_b12_feat", official_checkpoint("fcvit_b12_feat"),
                         tmp_path / "b.pdparams")
    assert code == 0, err
    assert "backbone keys under 'backbone.'" in out
    assert "left out     neck: 16 keys, rpn_head: 6 keys, roi_head: 20 keys" in out


def test_detectron2_file_groups_the_fpn_apart_from_the_backbone(tmp_path):
    """detectron2 keeps the FPN under ``backbone.`` too: only ``backbone.bottom_up.model.`` is ours."""
    from converter.checkpoint import take_backbone

    keys = {"backbone.bottom_up.model.patch_embed.proj.weight": 1, "backbone.fpn_lateral2.weight": 2,
            "backbone.fpn_lateral2.bias": 3, "roi_heads.box_head.fc1.weight": 4}
    inside, prefix, left_out = take_backbone(keys, "backbone.bottom_up.model.")
    assert inside == {"patch_embed.proj.weight": 1} and prefix == "backbone.bottom_up.model."
    assert left_out == {"backbone.fpn_lateral2": 2, "roi_heads": 1}


def test_imagenet_checkpoint_becomes_a_dense_backbone(official_checkpoint, tmp_path, capsys):
    """The usual start of detector training: head and final norm dropped by rule, the dense output
    norms initialised as the official code does, and the reference (loaded as the official non-strict
    loader loads it) agrees with the converted Paddle backbone."""
    src = official_checkpoint("fcvit_b12")
    code, out, err = cli(capsys, "convert", "fcvit_b12_feat", src, tmp_path / "init.pdparams")
    assert code == 0, err
    assert "an ImageNet classification checkpoint, converted into the dense backbone" in out
    assert "2 ImageNet classification head" in out and "2 final norm of the classifier" in out
    assert "initialised  8 dense output GroupNorm (weight 1, bias 0" in out
    import paddle

    params = paddle.load(str(tmp_path / "init.pdparams"))
    for i in (0, 2, 4, 6):
        assert np.all(params[f"norm{i}.weight"] == 1) and np.all(params[f"norm{i}.bias"] == 0)
    assert "head.weight" not in params and "norm.weight" not in params
    classifier = torch.load(src, weights_only=True)["state_dict"]
    reference = create_torch_model("fcvit_b12_feat", src).state_dict()
    assert torch.equal(reference["network.0.0.layer_scale_1"], classifier["network.0.0.layer_scale_1"])
    report = run_verify("fcvit_b12_feat", src, tmp_path / "init.pdparams", batch_size=1, input_size=(96, 160),
                        max_err=MAX_ABS_ERR)
    assert report.passed, report.format()


def test_reverse_writes_the_backbone_as_its_detector_file_holds_it(official_checkpoint, tmp_path, capsys):
    src = official_checkpoint("fcvit_b12_feat")
    assert cli(capsys, "convert", "fcvit_b12_feat", src, tmp_path / "w.pdparams")[0] == 0
    code, _, err = cli(capsys, "convert", "--reverse", "fcvit_b12_feat", tmp_path / "w.pdparams", tmp_path / "b.pth")
    assert code == 0, err
    back = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]
    original = torch.load(src, weights_only=True)["state_dict"]
    for key, tensor in back.items():
        assert key.startswith("backbone.")
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, original[key]), key
    assert cli(capsys, "convert", "fcvit_b12_feat", tmp_path / "b.pth", tmp_path / "again.pdparams")[0] == 0
    assert (tmp_path / "again.pdparams").read_bytes() == (tmp_path / "w.pdparams").read_bytes()


def test_verify_cli_takes_a_non_square_input_size(official_checkpoint, tmp_path, capsys):
    code, out, err = cli(capsys, "verify", "fcvit_b12_feat", "--torch-ckpt", official_checkpoint("fcvit_b12_feat"),
                         "--input-size", "72x104", "--batch-size", "1", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "72x104" in out and "PASS" in out
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["input_size"] == [[72, 104]] and len(data["features"]) == 4 and data["passed"]


# --- bad input: one line, exit 2, nothing written ---------------------------------------------

def test_detector_file_without_backbone_keys(official_checkpoint, tmp_path, capsys):
    full = torch.load(official_checkpoint("fcvit_b12_feat"), weights_only=True)
    full["state_dict"] = {k: v for k, v in full["state_dict"].items() if not k.startswith("backbone.")}
    torch.save(full, tmp_path / "neck_only.pth")
    code, _, err = cli(capsys, "convert", "fcvit_b12_feat", tmp_path / "neck_only.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "no backbone keys for fcvit_b12_feat", "neck (16)")
    assert_no_output(tmp_path, keep=("neck_only.pth",))


def test_classification_checkpoint_of_another_family(official_checkpoint, tmp_path, capsys):
    code, _, err = cli(capsys, "convert", "fcvit_b12_feat", official_checkpoint("regionvit_tiny"),
                       tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "no backbone keys for fcvit_b12_feat", "fits regionvit_tiny")
    assert_no_output(tmp_path)


@pytest.mark.parametrize("size", ["0x100", "100x", "axb", "1x2x3"])
def test_malformed_input_size(size, official_checkpoint, capsys):
    code, _, err = cli(capsys, "verify", "fcvit_b12_feat", "--torch-ckpt", official_checkpoint("fcvit_b12_feat"),
                       "--input-size", size)
    assert code == 2 and "is not N or HxW" in err and "Traceback" not in err


def test_eval_and_export_say_what_a_dense_backbone_is_for(official_checkpoint, tmp_path, capsys):
    code, _, err = cli(capsys, "eval", "fcvit_b12_feat", "--data", tmp_path, "--torch-ckpt",
                       official_checkpoint("fcvit_b12_feat"))
    assert_one_line_error(code, err, "dense backbone")
    code, _, err = cli(capsys, "export", "fcvit_b12_feat", tmp_path / "none.pdparams", tmp_path / "out")
    assert_one_line_error(code, err, "dense backbone")


def test_list_describes_dense_backbones(capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("fcvit_b12_feat"))
    assert "64/128/320/512" in line and "4/8/16/32" in line and "77e5a9d" in line and "mmdet 'backbone.'" in line


def test_input_size_the_official_code_rejects(tmp_path, capsys):
    """CrossFormer's merges need even maps: 250 is no multiple of 32.  Checked before anything loads."""
    code, _, err = cli(capsys, "verify", "crossformer_small_det", "--torch-ckpt", tmp_path / "not_read.pth",
                       "--input-size", "250x352")
    assert_one_line_error(code, err, "crossformer_small_det", "250")
