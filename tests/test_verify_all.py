"""verify --all: the zoo-wide regression gate.  Run here on fcvit_tiny only (every model's
parity is already tests/test_parity.py's job; this checks the gate itself)."""
import json
import shutil

from converter.registry import get_spec
from converter.verify_all import SEEDED, find_checkpoint, select_models

from conftest import assert_one_line_error, cli, error_lines

NAME = "fcvit_tiny"


def test_all_with_seeded_checkpoints_passes_and_writes_json(capsys, tmp_path):
    code, out, err = cli(capsys, "verify", "--all", "--models", NAME, "--json", tmp_path / "zoo.json")
    assert code == 0, err
    report = json.loads((tmp_path / "zoo.json").read_text())
    assert report["passed"] is True and report["not_found"] == []
    (model,) = report["models"]
    assert model["name"] == NAME and model["passed"] is True and model["checkpoint"] == SEEDED
    assert 0 < model["max_abs_err"] <= 1e-5 and 0 < model["mean_abs_err"] <= model["max_abs_err"]
    assert model["top1_agreement"] == 1.0 and model["error"] is None
    header = next(line for line in out.splitlines() if line.startswith("model "))
    assert header.split() == ["model", "max", "err", "mean", "err", "agreement", "time", "result"]
    assert "1 passed, 0 failed" in out


def test_all_from_a_checkpoint_dir_fails_the_gate_on_any_bad_model(capsys, tmp_path, official_checkpoint):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copy(official_checkpoint(NAME), ckpts / f"{NAME}.pth")
    (ckpts / "fcvit_b12.pth.tar").write_bytes(b"not a checkpoint")
    code, out, err = cli(capsys, "verify", "--all", "--ckpt-dir", ckpts, "--models", "fcvit_*",
                         "--json", tmp_path / "zoo.json")
    assert_one_line_error(code, err, "1 of 2 models failed verification: fcvit_b12", expected_code=1)
    report = json.loads((tmp_path / "zoo.json").read_text())
    assert report["passed"] is False
    by_name = {m["name"]: m for m in report["models"]}
    assert list(by_name) == [NAME, "fcvit_b12"]
    assert by_name[NAME]["passed"] is True and by_name[NAME]["checkpoint"] == str(ckpts / f"{NAME}.pth")
    assert by_name["fcvit_b12"]["passed"] is False and "not a PyTorch checkpoint" in by_name["fcvit_b12"]["error"]
    assert report["not_found"] == ["fcvit_b24", "fcvit_b48", "fcvit_b12_feat", "fcvit_b24_feat"]  # dense match too
    assert "ERROR" in out and "no checkpoint for 4 model(s): fcvit_b24, fcvit_b48, fcvit_b12_feat, fcvit_b24_feat" in out


def test_all_fails_past_max_err(capsys, tmp_path):
    code, out, err = cli(capsys, "verify", "--all", "--models", NAME, "--max-err", "1e-12",
                         "--json", tmp_path / "zoo.json")
    assert_one_line_error(code, err, f"1 of 1 models failed verification: {NAME}", expected_code=1)
    report = json.loads((tmp_path / "zoo.json").read_text())
    assert report["passed"] is False and report["models"][0]["max_abs_err"] > 1e-12
    assert "FAIL" in out and "0 passed, 1 failed" in out


def test_usage_errors_are_one_line(capsys, tmp_path, official_checkpoint):
    src = official_checkpoint(NAME)
    cases = [
        (["verify", NAME], "verify needs MODEL and --torch-ckpt (or --all"),
        (["verify", "--torch-ckpt", src], "verify needs MODEL and --torch-ckpt"),
        (["verify", "--all", NAME], "verify --all takes no MODEL"),
        (["verify", "--all", "--torch-ckpt", src], "verify --all takes no MODEL, --torch-ckpt"),
        (["verify", NAME, "--torch-ckpt", src, "--ckpt-dir", tmp_path], "--ckpt-dir, --models and --pairs go with --all"),
        (["verify", "--all", "--models", "resnet*"], "--models resnet*: matches no registered model"),
        (["verify", "--all", "--ckpt-dir", tmp_path / "nope"], "no such directory"),
        (["verify", "--all", "--ckpt-dir", tmp_path], "no checkpoint named after a selected model"),
    ]
    for args, message in cases:
        code, out, err = cli(capsys, *args)
        assert_one_line_error(code, err, message)
        assert error_lines(err) and not list(tmp_path.iterdir())


def test_checkpoint_names_and_model_globs(tmp_path):
    spec = get_spec("regionvit_tiny")
    assert find_checkpoint(tmp_path, spec) is None
    (tmp_path / "regionvit_tiny_224.safetensors").write_bytes(b"")  # an alias works as a file name
    assert find_checkpoint(tmp_path, spec) == tmp_path / "regionvit_tiny_224.safetensors"
    (tmp_path / "regionvit_tiny.pth").write_bytes(b"")  # the canonical name comes first
    assert find_checkpoint(tmp_path, spec) == tmp_path / "regionvit_tiny.pth"
    assert [s.name for s in select_models(["fcvit_b*", "regionvit_tiny_224"])] == [
        "fcvit_b12", "fcvit_b24", "fcvit_b48", "regionvit_tiny", "fcvit_b12_feat", "fcvit_b24_feat"]
    assert len(select_models()) == len(select_models(["*"])) >= 25
