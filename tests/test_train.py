"""Training-time pieces shared by every family, each framework on its own: the stochastic ops'
statistics, and train-mode BatchNorm against torch's (Paddle's stock layer drifts).  Per-family
gradient and optimizer-step parity: tests/test_train_<family>.py."""
import numpy as np
import paddle
import pytest
import torch

from converter.train import ACCURACY_FACTOR
from paddle_models import layers as paddle_layers
from paddle_models.numerics import BatchNorm2D
from reference_torch import layers as torch_layers

DRAWS = 4000  # samples per statistic: a kept fraction is then within 4 sigma = 0.032 of 1 - p


def _kept_and_scales(out: np.ndarray, x: np.ndarray) -> tuple:
    """Per sample: whether the branch was kept, and what it was multiplied by."""
    ratio = (out / x).reshape(out.shape[0], -1)
    return ratio[:, 0] != 0, ratio


@pytest.mark.parametrize("p", [0.1, 0.3])
@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_drop_path_keeps_whole_samples_and_rescales(framework, p):
    x = np.random.default_rng(0).uniform(1.0, 2.0, (DRAWS, 3, 4, 4)).astype(np.float32)
    if framework == "torch":
        torch.manual_seed(0)
        layer = torch_layers.DropPath(p).train()
        out = layer(torch.from_numpy(x)).numpy()
        eval_out = layer.eval()(torch.from_numpy(x)).numpy()
    else:
        paddle.seed(0)
        layer = paddle_layers.DropPath(p)
        layer.train()
        out = layer(paddle.to_tensor(x)).numpy()
        layer.eval()
        eval_out = layer(paddle.to_tensor(x)).numpy()
    kept, ratio = _kept_and_scales(out, x)
    # whole samples: every element of a sample shares its fate and its scale
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-6)
    np.testing.assert_allclose(ratio[kept, 0], 1.0 / (1.0 - p), rtol=1e-6)
    sigma = np.sqrt(p * (1 - p) / DRAWS)
    assert abs(kept.mean() - (1 - p)) < 4 * sigma, kept.mean()
    assert abs(out.mean() / x.mean() - 1.0) < 8 * sigma  # unbiased in expectation
    np.testing.assert_array_equal(eval_out, x)  # identity at inference


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_dropout_scales_in_training_not_at_inference(framework):
    p = 0.25
    x = np.ones((DRAWS, 64), np.float32)
    if framework == "torch":
        torch.manual_seed(0)
        layer = torch.nn.Dropout(p)
        train_out = layer.train()(torch.from_numpy(x)).numpy()
        eval_out = layer.eval()(torch.from_numpy(x)).numpy()
    else:
        paddle.seed(0)
        layer = paddle.nn.Dropout(p)  # mode="upscale_in_train", torch's behaviour
        layer.train()
        train_out = layer(paddle.to_tensor(x)).numpy()
        layer.eval()
        eval_out = layer(paddle.to_tensor(x)).numpy()
    assert set(np.unique(train_out)) <= {0.0, np.float32(1 / (1 - p))}
    sigma = np.sqrt(p * (1 - p) / x.size)
    assert abs((train_out == 0).mean() - p) < 4 * sigma
    np.testing.assert_array_equal(eval_out, x)


def test_drop_path_schedules_agree_between_frameworks():
    for rate, depths in ((0.1, (2, 2, 6, 2)), (0.3, (4, 4, 18, 4)), (0.0, (1, 1, 8, 6))):
        t = torch_layers.drop_path_schedule(rate, depths)
        p = paddle_layers.drop_path_schedule(rate, depths)
        assert [len(s) for s in t] == list(depths) == [len(s) for s in p]
        np.testing.assert_allclose(np.concatenate(p), np.concatenate(t), rtol=1e-6, atol=1e-9)
        assert t[0][0] == 0.0 and abs(t[-1][-1] - rate) < 1e-7


def _train_steps(layer, framework: str, batches) -> tuple:
    for x in batches:
        if framework == "torch":
            layer(torch.from_numpy(x))
        else:
            layer(paddle.to_tensor(x))
    if framework == "torch":
        return layer.running_mean.numpy(), layer.running_var.numpy()
    return layer._mean.numpy(), layer._variance.numpy()


def test_batchnorm_running_statistics_follow_torch_and_paddles_stock_layer_drifts():
    """Paddle's stock BatchNorm2D (with the momentum converted) updates the running variance with
    the biased batch variance: over a fine-tuning run it drifts from torch's.  Ours does not."""
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((2, 16, 7, 7)) * 3 + 1).astype(np.float32) for _ in range(20)]
    torch_bn = torch.nn.BatchNorm2d(16).train()
    ours = BatchNorm2D(16)
    ours.train()
    stock = paddle.nn.BatchNorm2D(16, momentum=0.9)  # torch's 0.1, converted
    stock.train()
    t_mean, t_var = _train_steps(torch_bn, "torch", batches)
    o_mean, o_var = _train_steps(ours, "paddle", batches)
    s_mean, s_var = _train_steps(stock, "paddle", batches)
    np.testing.assert_allclose(o_mean, t_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(o_var, t_var, rtol=1e-6)
    np.testing.assert_allclose(s_mean, t_mean, rtol=1e-6, atol=1e-6)  # the mean was never the problem
    drift = np.abs(s_var - t_var) / t_var
    assert drift.max() > 1e-3, drift.max()  # N / (N - 1) = 98 / 97 on 2 x 7 x 7
    # and the normalised output of a train-mode forward is the same in all three
    x = batches[0]
    out_t = torch_bn(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours(paddle.to_tensor(x)).numpy(), out_t, atol=1e-5)


def test_batchnorm_eval_mode_is_paddles_own():
    bn = BatchNorm2D(8, momentum=0.1, epsilon=1e-5)
    bn.eval()
    stock = paddle.nn.BatchNorm2D(8, momentum=0.9, epsilon=1e-5)
    stock.eval()
    stock.set_state_dict(bn.state_dict())
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((2, 8, 5, 5)).astype(np.float32))
    np.testing.assert_array_equal(bn(x).numpy(), stock(x).numpy())
    assert list(bn.state_dict()) == list(stock.state_dict())  # same keys: checkpoints convert as before


# --- verify --train and diff --backward through the CLI (FCViT: BatchNorm in the stem) -------------

def test_verify_train_cli_passes_and_reports(official_checkpoint, tmp_path, capsys):
    import json

    from conftest import cli

    code, out, err = cli(capsys, "verify", "fcvit_tiny", "--torch-ckpt", official_checkpoint("fcvit_tiny"), "--train",
                         "--steps", "2", "--optimizer", "adamw", "--json", tmp_path / "t.json")
    assert code == 0, out + err
    assert "step 2" in out and "PASS" in out
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["passed"] and report["failed_grads"] == 0 and report["num_params"] > 400
    # Each step's loss within the reference's own float32 error of the float64 loss, times the factor the
    # gradients are held to.  Not a fixed bound: after one AdamW step the weights carry float32 noise
    # that Adam's normalisation of near-zero gradients amplifies (torch float32's own weights 6.4e-3
    # relative off float64's), so step 2's loss moves with the CPU's kernels (Paddle 1.02e-6 off
    # torch's with MKL's AVX2 path on an AMD EPYC, 7.4e-7 on its generic path; torch's own 1.8e-7).
    for row in report["losses"]:
        own = max(abs(row["torch"] - row["float64"]), 1e-7 * abs(row["float64"]))
        assert abs(row["paddle"] - row["float64"]) <= ACCURACY_FACTOR * own, row
    assert report["running_stats_err"] < 1e-5


def test_diff_backward_names_the_layer_whose_gradient_goes_wrong(official_checkpoint):
    """A Paddle layer whose forward is exact but whose backward scales the gradient by 1.01: the
    first layer, in backward order, with a wrong output gradient is one that feeds it."""
    from converter.diff import layer_gradient_errors, pair_modules
    from converter.verify import prepare_run

    prepared = prepare_run("fcvit_tiny", official_checkpoint("fcvit_tiny"), batch_size=1, input_size=64)
    t_model, p_model = prepared.pair.torch_model, prepared.pair.paddle_model
    pairs, _ = pair_modules(t_model, p_model, prepared.spec.rules)
    target = "network.4.0.channel_mixer.fc2"
    layer = dict(p_model.named_sublayers())[target]

    class ScaleGradient(paddle.autograd.PyLayer):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    original = layer.forward
    layer.forward = lambda x: original(ScaleGradient.apply(x))
    labels = np.zeros(1, np.int64)
    layers, input_grad = layer_gradient_errors(t_model, p_model, pairs, prepared.batch, "cpu", labels)
    order = [d.torch for d in layers]
    first = next(d for d in layers if d.exceeds(1e-4))
    assert order.index(first.torch) > order.index(target)  # upstream of the tampered layer, in backward order
    assert first.torch.startswith("network.4.0.channel_mixer.")  # what feeds fc2 (its dropout or GELU)
    assert not any(d.exceeds(1e-4) for d in layers[:order.index(first.torch)])
    assert input_grad.max_abs_err > 0


def test_readme_fine_tuning_example_runs_as_written(official_checkpoint, tmp_path, monkeypatch, capsys):
    """The README's fine-tuning example, taken from the README itself and run on a converted file."""
    from converter import convert

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Fine-tuning on your own classes"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    convert("fcvit_tiny", official_checkpoint("fcvit_tiny"), tmp_path / "fcvit_tiny.pdparams")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    losses = [float(line.split("loss ")[1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert "accuracy on the batch" in out


def test_verify_train_fails_a_conversion_with_one_weight_off(official_checkpoint, tmp_path, capsys):
    """The gate can fail: one late 1x1 conv weight of the converted file off by 0.1% changes the
    gradients of the layers it feeds back into; verify --train says so in one line, exit code 1."""
    import json

    from conftest import assert_one_line_error, cli
    from converter import convert

    src = official_checkpoint("fcvit_tiny")
    params = dict(convert("fcvit_tiny", src, None).state_dict)
    key = "network.4.1.channel_mixer.fc1.weight"
    params[key] = (np.asarray(params[key]) * np.float32(1.001)).astype(np.float32)
    paddle.save(params, str(tmp_path / "off.pdparams"))
    code, out, err = cli(capsys, "verify", "fcvit_tiny", "--torch-ckpt", src, "--paddle-params",
                         tmp_path / "off.pdparams", "--train", "--steps", "1", "--input-size", "64",
                         "--json", tmp_path / "t.json")
    assert_one_line_error(code, err, "parameter gradient(s) differ", expected_code=1)
    report = json.loads((tmp_path / "t.json").read_text())
    assert not report["passed"] and report["failed_grads"] > 0
    assert "FAIL" in out
