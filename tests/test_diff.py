"""diff: corrupt one late Linear weight of a converted file and the first divergent layer must be
the module owning it; an untouched file has no divergent layer.  One variant per family."""
import json

import numpy as np
import paddle
import pytest

from converter import convert
from converter.api import load_pdparams
from converter.diff import DEFAULT_TOL, LayerDiff, compare_outputs, run_diff
from converter.engine import reverse_key
from converter.registry import get_spec
from mappings.rules import Transpose

from conftest import ONE_PER_FAMILY, assert_one_line_error, cli


def late_linear_weight(name: str, params: dict) -> str:
    """The Paddle key of the last Linear weight before the head, by the family's own table."""
    rules = get_spec(name).rules
    transposes = [r for r in rules if isinstance(r, Transpose)]
    linear = [k for k in params if any(t.matches(reverse_key(k, rules)) for t in transposes)
              and not k.startswith("head.")]
    return linear[-1]


def corrupted_copy(params: dict, key: str, path) -> None:
    """``params`` with noise of the tensor's own spread added to ``key``, saved at ``path``."""
    params = dict(params)
    w = np.asarray(params[key])
    noise = np.random.default_rng(1).standard_normal(w.shape).astype(np.float32) * w.std()
    params[key] = (w + noise).astype(np.float32)
    paddle.save(params, str(path))


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_first_divergent_layer_is_the_corrupted_one(name, official_checkpoint, tmp_path, capsys):
    src = official_checkpoint(name)
    good = tmp_path / "good.pdparams"
    convert(name, src, good)
    params = load_pdparams(good)

    untouched = run_diff(name, src, good)
    assert untouched.first_divergent is None, untouched.verdict()
    assert untouched.unpaired == [], "every torch module holding weights pairs through the table"
    assert len(untouched.layers) > 50
    assert all(layer.max_abs_err is not None and np.isfinite(layer.max_abs_err) for layer in untouched.layers)

    key = late_linear_weight(name, params)
    owner = key.rpartition(".")[0]
    bad = tmp_path / "bad.pdparams"
    corrupted_copy(params, key, bad)
    code, out, err = cli(capsys, "diff", name, "--torch-ckpt", src, "--paddle-params", bad,
                         "--json", tmp_path / "diff.json", "--plot", tmp_path / "diff.png")
    assert_one_line_error(code, err, f"first divergent layer: {owner}", expected_code=1)
    report = json.loads((tmp_path / "diff.json").read_text())
    assert report["first_divergent_layer"] == owner
    layers = report["layers"]
    assert {"torch", "paddle", "max_abs_err", "mean_abs_err"} <= set(layers[0])
    first = next(i for i, layer in enumerate(layers) if layer["torch"] == owner)
    tol = report["tol"]
    # (or past it without reaching the module around them: BiFormer's KV gather after a routing tie)
    assert all(layer["max_abs_err"] <= tol * max(1.0, layer["scale"]) or layer["absorbed_by"] for layer in layers[:first])
    assert layers[first]["max_abs_err"] > 100 * tol * max(1.0, layers[first]["scale"])
    # The same batch through the same layers: only the corrupted layer and what follows it differ.
    assert [(l["torch"], l["call"]) for l in layers] == [(l.torch, l.call) for l in untouched.layers]
    assert f"{owner}" in out and "<- first divergent" in out
    assert (tmp_path / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layers_in_execution_order_with_repeated_calls(official_checkpoint):
    report = run_diff("fcvit_tiny", official_checkpoint("fcvit_tiny"))
    labels = [(layer.torch, layer.call) for layer in report.layers]
    # A module finishes after the modules inside it; the stem runs first.
    assert labels[:3] == [("patch_embed.proj", 1), ("patch_embed.norm", 1), ("patch_embed", 1)]
    # TokenMixer applies its one GELU twice: both calls are compared, in order.
    act = [i for i, (path, _) in enumerate(labels) if path == "network.0.0.token_mixer.act"]
    assert [labels[i][1] for i in act] == [1, 2] and act[0] < labels.index(("network.0.0.token_mixer.dw2", 1)) < act[1]
    assert labels[-2:] == [("norm", 1), ("head", 1)]


def test_verify_names_the_first_divergent_layer_when_its_gate_fails(official_checkpoint, tmp_path, capsys):
    name = "fcvit_tiny"
    src = official_checkpoint(name)
    params = convert(name, src, None).state_dict
    corrupted_copy(params, "network.4.1.channel_mixer.fc1.weight", tmp_path / "bad.pdparams")
    code, out, err = cli(capsys, "verify", name, "--torch-ckpt", src, "--paddle-params", tmp_path / "bad.pdparams",
                         "--json", tmp_path / "verify.json")
    assert_one_line_error(code, err, "exceeds --max-err", expected_code=1)
    assert "first divergent layer: network.4.1.channel_mixer.fc1 " in out
    assert json.loads((tmp_path / "verify.json").read_text())["first_divergent_layer"] == \
        "network.4.1.channel_mixer.fc1"


def test_tolerance_is_absolute_below_magnitude_one_and_relative_above():
    small = LayerDiff("a", "a", 1, max_abs_err=2e-4, mean_abs_err=1e-5, scale=0.5)
    large = LayerDiff("b", "b", 1, max_abs_err=2e-4, mean_abs_err=1e-5, scale=164.0)
    nan = LayerDiff("c", "c", 1, max_abs_err=float("nan"), mean_abs_err=float("nan"), scale=1.0)
    assert small.exceeds(1e-4) and not large.exceeds(1e-4) and nan.exceeds(1e-4)
    assert not LayerDiff("d", "d", 1, None, None, note="outputs differ in structure").exceeds(DEFAULT_TOL)


def test_a_difference_that_does_not_reach_the_enclosing_module_is_not_the_first_divergence():
    from converter.diff import DiffReport
    from converter.verify import Discrepancy

    def report(*layers):
        return DiffReport("m", "model", "p", "seeded", 2, 224, "cpu", tol=1e-4, layers=list(layers),
                          logits=Discrepancy(1e-6, 1e-7, 1e-6))

    def layer(name, err, call=1):
        return LayerDiff(name, name, call, max_abs_err=err, mean_abs_err=err / 10, scale=2.0)

    # a gather whose rows came in another order (a routing tie): the attention around it agrees
    gathered = report(layer("b.attn.router", 1e-7), layer("b.attn.kv_gather", 2.0), layer("b.attn.proj", 1e-6),
                      layer("b.attn", 1e-6), layer("b", 1e-6))
    assert gathered.first_divergent is None and gathered.absorbed_by(1).torch == "b.attn"
    assert "b.attn.kv_gather, whose difference does not reach the module around it" in gathered.verdict()
    assert "largest layer error 1.000e-06" in gathered.verdict()
    assert "does not reach b.attn, whose output agrees" in gathered.format()
    # a real fault reaches the enclosing module: named, and the enclosing call is the next to finish
    broken = report(layer("b.attn", 1e-6, call=1), layer("b.attn.proj", 2.0), layer("b.attn", 2.0, call=2))
    assert broken.first_divergent.torch == "b.attn.proj"
    assert report(layer("b.attn.proj", 2.0)).first_divergent.torch == "b.attn.proj"  # nothing encloses it


def test_outputs_that_cannot_be_compared_say_why():
    a = np.ones((2, 3), np.float32)
    assert "differ in structure" in compare_outputs([a], [a, a])["note"]
    assert "differ in structure" in compare_outputs([a], [a.T])["note"]
    index = np.arange(6).reshape(2, 3)
    found = compare_outputs([a, index], [a + 0.5, index[::-1]])
    assert found["max_abs_err"] == 0.5 and found["note"] == "6 integer/boolean output elements differ"


def test_plot_problems_are_reported_before_the_models_run(official_checkpoint, tmp_path, capsys, monkeypatch):
    src = official_checkpoint("fcvit_tiny")
    code, _, err = cli(capsys, "diff", "fcvit_tiny", "--torch-ckpt", src, "--plot", tmp_path / "errors.xyz")
    assert_one_line_error(code, err, "use a suffix matplotlib knows")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    code, _, err = cli(capsys, "diff", "fcvit_tiny", "--torch-ckpt", src, "--plot", tmp_path / "errors.png")
    assert_one_line_error(code, err, "--plot needs matplotlib", "pip install 'torch2paddle[plot]'")
    assert list(tmp_path.iterdir()) == []
