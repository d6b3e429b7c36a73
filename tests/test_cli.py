"""The command line: the happy paths, and every kind of bad input gets one clear error line,
a non-zero exit and no output file."""
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RunsShell, assert_no_output, assert_one_line_error, cli, error_lines, run_cli

NAME = "fcvit_tiny"


@pytest.fixture
def src(official_checkpoint):
    return official_checkpoint(NAME)


def test_convert_then_verify_with_json(capsys, src, tmp_path):
    dst = tmp_path / "out.pdparams"
    code, out, err = cli(capsys, "convert", NAME, src, dst)
    assert code == 0, err
    assert "transposed (Linear)" in out and "BatchNorm step counter" in out and "parameters" in out
    report_path = tmp_path / "report.json"
    code, out, err = cli(capsys, "verify", NAME, "--torch-ckpt", src, "--paddle-params", dst,
                         "--max-err", "1e-4", "--json", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["model"] == NAME and report["passed"] is True
    assert report["max_abs_err"] <= 1e-5 and report["top1_agreement"] == 1.0
    assert {"mean_abs_err", "max_rel_err", "stages", "torch_seconds", "paddle_seconds"} <= set(report)
    assert [s["name"] for s in report["stages"]] == ["network.0", "network.2", "network.4", "network.6"]


def test_verify_gate_fails_on_a_tampered_weight(capsys, src, tmp_path):
    import paddle

    dst = tmp_path / "out.pdparams"
    cli(capsys, "convert", NAME, src, dst)
    params = paddle.load(str(dst))
    params["network.6.1.channel_mixer.fc2.weight"] = params["network.6.1.channel_mixer.fc2.weight"] * 1.01
    paddle.save(params, str(dst))
    code, out, err = cli(capsys, "verify", NAME, "--torch-ckpt", src, "--paddle-params", dst, "--max-err", "1e-4")
    assert_one_line_error(code, err, "exceeds --max-err", expected_code=1)
    assert "FAIL" in out


def test_verify_on_real_images(capsys, src, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, size in enumerate([(320, 240), (200, 300)]):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    code, out, err = cli(capsys, "verify", NAME, "--torch-ckpt", src, "--images", tmp_path)
    assert code == 0, err
    assert "2 images" in out and "resize 248 bicubic, crop 224" in out


def test_verify_converts_in_memory_without_paddle_params(capsys, src):
    code, out, err = cli(capsys, "verify", NAME, "--torch-ckpt", src)
    assert code == 0, err
    assert "converted in memory" in out


def test_list_shows_every_model_with_official_parameter_count(capsys):
    from converter.registry import MODELS

    from conftest import has_manifest, load_manifest

    code, out, err = cli(capsys, "list")
    assert code == 0, err
    for name, spec in MODELS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        if has_manifest(name):
            assert f"{load_manifest(name)['num_parameters'] / 1e6:.2f}M" in line, line
        if spec.dense:
            assert "/".join(map(str, spec.dense.channels)) in line and spec.dense.checkpoint_prefix in line, line
        else:
            assert "bicubic" in line


# --- bad input --------------------------------------------------------------------------

def test_unknown_model_suggests_close_names(capsys, src, tmp_path):
    code, _, err = cli(capsys, "convert", "fcvit_b21", src, tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "unknown model 'fcvit_b21'", "did you mean", "fcvit_b12")
    assert_no_output(tmp_path)


def test_wrong_architecture_checkpoint(capsys, tmp_path):
    resnet_stem = torch.nn.Sequential(OrderedDict(conv1=torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                                                  bn1=torch.nn.BatchNorm2d(64), fc=torch.nn.Linear(512, 1000)))
    torch.save({"state_dict": resnet_stem.state_dict()}, tmp_path / "resnet.pth")
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "resnet.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "does not match the model", "missing", "unexpected")
    assert_no_output(tmp_path, keep=["resnet.pth"])


def test_other_variant_of_the_same_family(capsys, official_checkpoint, tmp_path):
    code, _, err = cli(capsys, "convert", "fcvit_b12", official_checkpoint(NAME), tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "shape mismatch")
    assert_no_output(tmp_path)


def _edited_checkpoint(src, path, edit):
    sd = torch.load(src, weights_only=True)["state_dict"]
    edit(sd)
    torch.save({"state_dict": sd}, path)
    return path


def test_missing_key(capsys, src, tmp_path):
    bad = _edited_checkpoint(src, tmp_path / "bad.pth", lambda sd: sd.pop("norm.weight"))
    code, _, err = cli(capsys, "convert", NAME, bad, tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "1 missing (e.g. norm.weight)")
    assert_no_output(tmp_path, keep=["bad.pth"])


def test_unexpected_key(capsys, src, tmp_path):
    bad = _edited_checkpoint(src, tmp_path / "bad.pth", lambda sd: sd.update({"norm.extra": torch.zeros(3)}))
    code, _, err = cli(capsys, "convert", NAME, bad, tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "1 unexpected (e.g. norm.extra)")
    assert_no_output(tmp_path, keep=["bad.pth"])


def test_shape_mismatch(capsys, src, tmp_path):
    bad = _edited_checkpoint(src, tmp_path / "bad.pth", lambda sd: sd.update({"norm.weight": torch.zeros(7)}))
    code, _, err = cli(capsys, "convert", NAME, bad, tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "1 shape mismatch (e.g. norm.weight (7,)")
    assert_no_output(tmp_path, keep=["bad.pth"])


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n", b"PK\x03\x04garbage"],
                         ids=["empty", "text", "fake-zip"])
def test_non_checkpoint_files(capsys, tmp_path, content):
    (tmp_path / "x.pth").write_bytes(content)
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "x.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "x.pth")
    assert_no_output(tmp_path, keep=["x.pth"])


def test_truncated_checkpoint(capsys, src, tmp_path):
    data = src.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "cut.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "truncated or corrupted")
    assert_no_output(tmp_path, keep=["cut.pth"])


def test_truncated_safetensors(capsys, official_checkpoint, tmp_path):
    data = official_checkpoint(NAME, suffix=".safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "cut.safetensors", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "not a readable safetensors file")
    assert_no_output(tmp_path, keep=["cut.safetensors"])


def test_missing_input_file(capsys, tmp_path):
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "nope.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "nope.pth: no such file")


def test_existing_output_without_force(capsys, src, tmp_path):
    (tmp_path / "o.pdparams").write_bytes(b"keep me")
    code, _, err = cli(capsys, "convert", NAME, src, tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "already exists; pass --force")
    assert (tmp_path / "o.pdparams").read_bytes() == b"keep me"
    assert_no_output(tmp_path, keep=["o.pdparams"])


class _Unknown:
    def __reduce__(self):
        return (_Unknown, ())


def test_pickle_that_runs_code_is_refused(capsys, src, tmp_path):
    marker = tmp_path / "pwned"
    sd = torch.load(src, weights_only=True)["state_dict"]
    torch.save({"state_dict": sd, "payload": RunsShell(marker)}, tmp_path / "evil.pth")
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "evil.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, f"refused global '{os.system.__module__}.system'", "--unsafe-pickle")
    assert not marker.exists()
    assert_no_output(tmp_path, keep=["evil.pth"])


def test_pickle_with_unknown_class_is_refused(capsys, tmp_path):
    with open(tmp_path / "odd.pth", "wb") as f:  # a legacy (non-zip) pickle
        pickle.dump({"state_dict": {}, "obj": _Unknown()}, f)
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "odd.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "odd.pth")
    assert_no_output(tmp_path, keep=["odd.pth"])


def test_input_size_constraint_is_checked_up_front(capsys, official_checkpoint):
    code, _, err = cli(capsys, "verify", "biformer_tiny", "--torch-ckpt", official_checkpoint(NAME),
                       "--input-size", "200")
    assert_one_line_error(code, err, "not a multiple of 112")


def test_real_process_exit_codes(src, tmp_path):
    """The CLI as a user runs it (``python -m converter``): exit status and stderr of a real process."""
    code, out, err = run_cli("convert", "no_such_model", src, tmp_path / "o.pdparams")
    assert code == 2 and error_lines(err) == ["error: unknown model 'no_such_model'; run 'torch2paddle list' for all models"]
    code, out, err = run_cli("convert", NAME, src, tmp_path / "o.pdparams")
    assert code == 0 and (tmp_path / "o.pdparams").is_file(), err


@pytest.mark.parametrize("user_setting", [None, "1"])
def test_commands_that_time_both_frameworks_give_paddle_torchs_thread_count(user_setting, monkeypatch, capsys):
    """Paddle pins itself to one thread at import, torch uses every core; a user's own
    OMP_NUM_THREADS is left to both."""
    import paddle

    calls = []
    monkeypatch.setattr(paddle.base.core, "set_num_threads", calls.append)
    if user_setting is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_setting)
    code, _, err = cli(capsys, "verify", "fcvit_tiny", "--torch-ckpt", "/nonexistent.pth")
    assert code == 2 and "no such file" in err  # the thread count is set before the command runs
    assert calls == ([torch.get_num_threads()] if user_setting is None else [])


@pytest.mark.parametrize("vendor,user_value,expected", [
    ("AuthenticAMD", None, "5"),        # Paddle's MKL takes its AVX2 kernels on AMD
    ("GenuineIntel", None, None),       # Intel: MKL dispatches well by itself
    ("AuthenticAMD", "0", "0"),         # the user's own choice wins
])
def test_the_cli_prefers_mkl_avx2_kernels_on_amd(vendor, user_value, expected, monkeypatch, tmp_path):
    from converter import cli as cli_module

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n")
    monkeypatch.setattr(cli_module, "Path", lambda path: cpuinfo if path == "/proc/cpuinfo" else Path(path))
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", user_value or "")  # the test's value; the original comes back after it
    if user_value is None:
        monkeypatch.delenv("MKL_DEBUG_CPU_TYPE")
    cli_module.prefer_mkl_avx2_on_amd()
    assert os.environ.get("MKL_DEBUG_CPU_TYPE") == expected
