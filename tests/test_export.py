"""export: a static inference model that reloads and computes what the dynamic model computes
(one variant per family), and a clear error with nothing written when a model cannot be traced."""
import ast
import json
import re

import numpy as np
import paddle
import pytest

from converter import convert, create_paddle_model
from converter.export import RUNTIMES, ExportReport, export_model

from conftest import MAX_ABS_ERR, ONE_PER_FAMILY, assert_one_line_error, cli


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_exported_model_equals_the_dynamic_model(name, official_checkpoint, tmp_path):
    params = tmp_path / f"{name}.pdparams"
    convert(name, official_checkpoint(name), params)
    out = tmp_path / "export"
    report = export_model(name, params, out)  # raises UserError when the model cannot be traced
    assert report.passed, report.format()
    # Every batch size in every runtime: paddle.jit.load, and Paddle Inference with oneDNN off, on (its
    # CPU default, whose graph passes and kernels the ports must survive: paddle_models/onednn.py) and
    # on for the fused ops only (the recommended configuration).
    assert {"Paddle Inference (CPU, oneDNN off)", "Paddle Inference (CPU, oneDNN on)",
            "Paddle Inference (CPU, oneDNN fused ops only)"} < set(RUNTIMES)
    assert sorted((c["runtime"], c["batch_size"]) for c in report.checks) == sorted(
        (runtime, n) for runtime in RUNTIMES for n in (1, 2))
    assert all(c["max_abs_err"] <= MAX_ABS_ERR for c in report.checks), report.format()
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "inference.json", "inference.pdiparams"]
    meta = json.loads((out / "export.json").read_text())
    assert meta["input"]["shape"] == [None, 3, 224, 224] and meta["preprocessing"]["interpolation"] == "bicubic"
    # The recommended configuration is the one that ran the largest checked batch fastest.
    recommended = meta["paddle_inference"]["recommended"]
    timed = {c["runtime"]: c["median_ms"] for c in meta["checks"] if c["batch_size"] == 2
             and c["runtime"].startswith("Paddle Inference")}
    assert len(timed) == 3 and recommended["runtime"] == min(timed, key=timed.get)

    # Independently of the report: reload and run a batch size the export never saw.
    batch = np.random.default_rng(7).standard_normal((3, 3, 224, 224), dtype=np.float32)
    dynamic = create_paddle_model(name, params)
    static = paddle.jit.load(str(out / "inference"))
    with paddle.no_grad():
        expected = dynamic(paddle.to_tensor(batch)).numpy()
        actual = static(paddle.to_tensor(batch)).numpy()
    assert actual.shape == (3, 1000)
    assert np.abs(actual - expected).max() <= MAX_ABS_ERR

    # And as a deployment gets it by default: Paddle Inference's plain CPU config, oneDNN on; and set
    # up as export.json's recommended configuration says, call by call.
    default = _config(out)
    assert default.mkldnn_enabled()
    assert np.abs(_predict(default, batch) - expected).max() <= MAX_ABS_ERR
    recommended_config = _config(out)
    for call in recommended["config_calls"]:
        name, args = re.fullmatch(r"(\w+)\((.*)\)", call).groups()
        getattr(recommended_config, name)(*ast.literal_eval(f"({args},)" if args else "()"))
    assert np.abs(_predict(recommended_config, batch) - expected).max() <= MAX_ABS_ERR


def _config(out):
    config = paddle.inference.Config(str(out / "inference.json"), str(out / "inference.pdiparams"))
    config.disable_glog_info()
    return config


def _predict(config, batch):
    predictor = paddle.inference.create_predictor(config)
    feed = predictor.get_input_handle(predictor.get_input_names()[0])
    feed.reshape(list(batch.shape))
    feed.copy_from_cpu(batch)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def test_fixed_batch_and_a_failed_check_writes_nothing(official_checkpoint, tmp_path):
    params = tmp_path / "w.pdparams"
    convert("fcvit_tiny", official_checkpoint("fcvit_tiny"), params)
    # A gate no output can pass: the export runs, is checked, and must not be kept.
    report = export_model("fcvit_tiny", params, tmp_path / "export", batch_size=2, max_err=-1.0)
    assert not report.passed and report.input_spec == [2, 3, 224, 224]
    assert [c["batch_size"] for c in report.checks] == [2] * len(RUNTIMES)
    assert all(c["max_abs_err"] <= MAX_ABS_ERR for c in report.checks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pdparams"]


@pytest.mark.parametrize("name", ONE_PER_FAMILY + ["biformer_stl_nchw"])
def test_a_fixed_batch_export_runs_under_onednn(name, official_checkpoint, tmp_path):
    # A fixed batch makes every reshape target a constant, which Paddle 3.3.1's oneDNN
    # transpose+reshape fuse pass then matches (paddle_models/onednn.py): the graph must still run.
    params = tmp_path / f"{name}.pdparams"
    convert(name, official_checkpoint(name), params)
    report = export_model(name, params, tmp_path / "export", batch_size=3)
    assert report.passed and report.input_spec == [3, 3, 224, 224], report.format()
    assert [c["batch_size"] for c in report.checks] == [3] * len(RUNTIMES)
    assert all(c["max_abs_err"] <= MAX_ABS_ERR for c in report.checks), report.format()


def test_the_gate_scales_with_the_logits():
    """max_err, times the dynamic model's largest |logit| where that exceeds 1: oneDNN's float32
    rounding differs by ~1e-6 of the logits' magnitude, which trained classifiers put near 10."""
    def report(err, logit):
        check = {"runtime": RUNTIMES[-1], "batch_size": 1, "max_abs_err": err, "mean_abs_err": err / 10,
                 "max_abs_logit": logit}
        return ExportReport("m", "out", [None, 3, 224, 224], 1e-5, checks=[check])

    assert report(5e-5, 10.0).passed and not report(2e-4, 10.0).passed
    assert report(9e-6, 0.5).passed and not report(2e-5, 0.5).passed  # never looser than max_err itself
    assert "FAIL" in report(2e-4, 10.0).format() and RUNTIMES[-1] in report(2e-4, 10.0).format()


def _untraceable_forward(self, x):
    # A return inside a loop over enumerate() with a tuple target: Paddle 3.3.1's dy2static
    # cannot convert it (the pattern in BiFormer's input check, which paddle_models/biformer.py
    # therefore keeps out of the trace with @paddle.jit.not_to_static).
    for i, (h, w) in enumerate([(x.shape[-2], x.shape[-1])]):
        if h != w:
            return None
    return self.head(self.forward_features(x).mean(axis=[-2, -1]))


def test_a_model_that_cannot_be_traced_fails_clearly(official_checkpoint, tmp_path, capsys, monkeypatch):
    import paddle_models.fcvit

    params = tmp_path / "w.pdparams"
    convert("fcvit_tiny", official_checkpoint("fcvit_tiny"), params)
    monkeypatch.setattr(paddle_models.fcvit.FCViT, "forward", _untraceable_forward)
    code, _, err = cli(capsys, "export", "fcvit_tiny", params, tmp_path / "export")
    assert_one_line_error(code, err, "fcvit_tiny cannot be exported to a static graph",
                          "AttributeError", "while converting FCViT.forward")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pdparams"]


def test_output_directory_rules(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "export", "fcvit_tiny", tmp_path / "w.pdparams", taken, "--force")
    assert_one_line_error(code, err, "holds something other than an export")
    (taken / "notes.txt").unlink()
    (taken / "export.json").write_text("{}")
    code, _, err = cli(capsys, "export", "fcvit_tiny", tmp_path / "w.pdparams", taken)
    assert_one_line_error(code, err, "already holds an export; pass --force")
    code, _, err = cli(capsys, "export", "fcvit_tiny", tmp_path / "w.pdparams", tmp_path / "new")
    assert_one_line_error(code, err, "w.pdparams: no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("bias", [True, False])
def test_traced_attention_heads_equal_dygraphs(bias):
    # layers.qkv_heads: a traced graph projects q, k, v by the weight's three column blocks, dygraph
    # permutes one projection; the same heads either way, and a bias-free projection traces too
    from paddle_models import layers

    class Heads(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.qkv = paddle.nn.Linear(32, 96, bias_attr=None if bias else False)

        def forward(self, x):
            return paddle.stack(layers.qkv_heads(self.qkv, x, 4))

    model = Heads()
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((2, 5, 32)).astype(np.float32))
    dygraph = model(x).numpy()
    traced = paddle.jit.to_static(model, input_spec=[paddle.static.InputSpec([None, 5, 32], "float32")],
                                  full_graph=True)
    assert dygraph.shape == (3, 2, 4, 5, 8)
    assert np.abs(traced(x).numpy() - dygraph).max() <= 1e-6 * np.abs(dygraph).max()  # GEMMs of other widths


def test_a_traced_token_mlp_runs_on_rows_and_equals_dygraphs():
    # layers.token_rows: a traced graph runs an NHWC map's MLP on [B, H*W, C] rows (so Paddle
    # Inference puts its Linears on oneDNN's fc, GELU fused) and reshapes back; dygraph runs it as is
    from paddle_models import layers

    class TokenMLP(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.mlp = paddle.nn.Sequential(paddle.nn.Linear(16, 48), paddle.nn.GELU(), paddle.nn.Linear(48, 24))

        def forward(self, x):
            return layers.token_rows(self.mlp, x)

    model = TokenMLP()
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(4).standard_normal((2, 3, 5, 16)).astype(np.float32))
    dygraph = model(x).numpy()
    traced = paddle.jit.to_static(model, input_spec=[paddle.static.InputSpec([None, 3, 5, 16], "float32")],
                                  full_graph=True)
    program = str(traced.forward.concrete_program.main_program)
    assert "tensor<-1x-1x16xf32>" in program and "tensor<-1x3x5x48xf32>" not in program  # the Linears see rows
    assert dygraph.shape == (2, 3, 5, 24)
    assert np.abs(traced(x).numpy() - dygraph).max() <= 1e-6 * np.abs(dygraph).max()
