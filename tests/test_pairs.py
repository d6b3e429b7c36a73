"""Pair files and `torch2paddle map` on models defined here (no timm, no PaddleClas): the mapping a
pair file states, each kind of undecidable pairing as its own clear error, hand edits honoured on a
re-run, the built-in families' tables re-derived by map, a plug-in package's pair in `list` and
`verify --all`, and bad specs as one line."""
import sys
import textwrap
import tomllib

import numpy as np
import pytest

from conftest import ONE_PER_FAMILY, assert_one_line_error, cli

# A torch model and a Paddle model that compute the same function under other names: a conv stem
# with BatchNorm, a parameter-only scale on the model itself, a token mixer (one Linear, or q/k/v
# siblings, or a fused qkv), a LayerNorm and a head.  Switches make the two sides differ.
NETS = textwrap.dedent('''
    import torch
    import paddle


    class TorchNet(torch.nn.Module):
        def __init__(self, width=8, mixer="proj", num_classes=10, branches=False):
            super().__init__()
            self.mixer = mixer
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(width))
            if branches:  # RepVGG-like: a 3x3 and a 1x1 branch on the same input, each with its BatchNorm
                self.dense = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, 1, 1), torch.nn.BatchNorm2d(width))
                self.point = torch.nn.Sequential(torch.nn.Conv2d(width, width, 1), torch.nn.BatchNorm2d(width))
            self.branches = branches
            self.scale = torch.nn.Parameter(torch.ones(width))
            if mixer == "fused":
                self.qkv = torch.nn.Linear(width, 3 * width)
            elif mixer == "siblings":
                self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
            else:
                self.proj = torch.nn.Linear(width, width)
            self.norm = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.stem(x).relu()
            if self.branches:
                x = self.dense(x) + self.point(x)  # 3x3 first
            x = (x * self.scale[:, None, None]).mean((2, 3))
            if self.mixer == "fused":
                q, k, v = self.qkv(x).chunk(3, -1)
                y = q * k + v
            elif self.mixer == "siblings":
                y = self.q(x) * self.k(x) + self.v(x)
            else:
                y = self.proj(x)
            return self.head(self.norm(x + y))


    class PaddleNet(paddle.nn.Layer):
        def __init__(self, width=8, mixer="proj", num_classes=10, extra=False, proj_bias=True, branches=False):
            super().__init__()
            self.mixer = mixer
            self.conv = paddle.nn.Conv2D(3, width, 3, 2, 1, bias_attr=False)
            self.bn = paddle.nn.BatchNorm2D(width)
            self.branches = branches
            if branches:
                self.b1x1, self.b1x1_bn = paddle.nn.Conv2D(width, width, 1), paddle.nn.BatchNorm2D(width)
                self.b3x3, self.b3x3_bn = paddle.nn.Conv2D(width, width, 3, 1, 1), paddle.nn.BatchNorm2D(width)
            self.extra = paddle.nn.Conv2D(width, width, 1) if extra else None
            self.gamma = self.create_parameter([width], default_initializer=paddle.nn.initializer.Constant(1.0))
            if mixer == "siblings":
                self.to_q, self.to_k, self.to_v = (paddle.nn.Linear(width, width) for _ in range(3))
            else:
                self.mix = paddle.nn.Linear(width, width, bias_attr=None if proj_bias else False)
            self.ln = paddle.nn.LayerNorm(width)
            self.fc = paddle.nn.Linear(width, num_classes)

        def forward(self, x):
            x = paddle.nn.functional.relu(self.bn(self.conv(x)))
            if self.branches:
                x = self.b1x1_bn(self.b1x1(x)) + self.b3x3_bn(self.b3x3(x))  # 1x1 first
            if self.extra is not None:
                x = self.extra(x)
            x = (x * self.gamma[:, None, None]).mean((2, 3))
            y = self.to_q(x) * self.to_k(x) + self.to_v(x) if self.mixer == "siblings" else self.mix(x)
            return self.fc(self.ln(x + y))


    def torch_net(**kwargs):
        return TorchNet(**kwargs)


    def paddle_net(**kwargs):
        return PaddleNet(**kwargs)


    NOT_A_MODEL = 42


    def not_a_model():
        return {"weights": [1, 2, 3]}
''')


@pytest.fixture
def nets(tmp_path, monkeypatch, restore_registry):
    """The module ``pairnets`` importable; the registry restored after the test."""
    (tmp_path / "pairnets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("pairnets", None)


def run_map(capsys, torch_spec, paddle_spec, out, *extra):
    return cli(capsys, "map", torch_spec, paddle_spec, "-o", out, "--input-size", "32", *extra)


def test_map_writes_a_pair_file_that_converts_and_verifies(capsys, nets, tmp_path):
    pair = tmp_path / "tiny.toml"
    code, out, err = run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net", pair)
    assert code == 0, err
    data = tomllib.loads(pair.read_text())
    assert data["torch"]["spec"] == "pairnets:torch_net" and data["pair"]["num_classes"] == 10
    rules = data["rules"]
    assert ["stem.0", "conv"] in rules["moves"] and ["stem.1", "bn"] in rules["moves"]
    assert ["running_mean", "_mean"] in rules["renames"]
    # Transposed: the nn.Linear weights and nothing else (the parameter-only `scale` is 1-D anyway).
    assert sorted(rules["transposes"]) == [r"^head\.weight$", r"^proj\.weight$"]
    assert [d["pattern"] for d in rules["drops"]] == [r"(^|\.)num_batches_tracked$"]

    from converter.fixtures import make_official_checkpoint

    ckpt = make_official_checkpoint(str(pair), tmp_path / "tiny.pth", container="raw")
    dst = tmp_path / "tiny.pdparams"
    code, out, err = cli(capsys, "convert", pair, ckpt, dst)
    assert code == 0, err
    assert "3 transposed" not in out and "2 transposed" in out
    code, out, err = cli(capsys, "verify", pair, "--torch-ckpt", ckpt, "--paddle-params", dst, "--max-err", "1e-5")
    assert code == 0, err
    assert "PASS" in out
    # scale -> gamma (a parameter-only module, paired by shape) really is the same tensor
    import paddle
    import torch

    assert np.array_equal(paddle.load(str(dst))["gamma"], torch.load(ckpt)["scale"].numpy())


def test_pair_through_reverse_diff_and_export(capsys, nets, tmp_path):
    pair = tmp_path / "tiny.toml"
    assert run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net", pair)[0] == 0
    from converter.fixtures import make_official_checkpoint

    ckpt = make_official_checkpoint(str(pair), tmp_path / "tiny.pth")
    dst, back = tmp_path / "tiny.pdparams", tmp_path / "back.pth"
    assert cli(capsys, "convert", pair, ckpt, dst)[0] == 0
    code, out, err = cli(capsys, "convert", "--reverse", pair, dst, back)
    assert code == 0, err
    import torch

    original, returned = torch.load(ckpt)["state_dict"], torch.load(back)["state_dict"]
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(returned[key], value), key
    code, out, err = cli(capsys, "diff", pair, "--torch-ckpt", ckpt, "--paddle-params", dst)
    assert code == 0, err
    assert "stem.0 -> conv" in out and "no layer diverges" in out
    code, out, err = cli(capsys, "export", pair, dst, tmp_path / "infer")
    assert code == 0, err
    assert (tmp_path / "infer" / "inference.pdiparams").is_file()


def test_eval_runs_a_pair(capsys, nets, tmp_path):
    from PIL import Image

    pair = tmp_path / "tiny.toml"
    assert run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net", pair)[0] == 0
    from converter.fixtures import make_official_checkpoint

    ckpt = make_official_checkpoint(str(pair), tmp_path / "tiny.pth")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / label / f"{i}.png")
    code, out, err = cli(capsys, "eval", pair, "--data", tmp_path / "data", "--torch-ckpt", ckpt, "--num-classes", "10",
                         "--no-progress", "--workers", "0")
    assert code == 0, err
    assert "resize 36 bicubic, crop 32" in out and "4 evaluated" in out
    assert "agreement    100.000% same top-1 class" in out


def test_parallel_branches_pair_whatever_order_they_run_in(capsys, nets, tmp_path):
    """A 3x3 and a 1x1 branch on the same input, run in the other order on the Paddle side: each
    conv pairs by its shape, and each BatchNorm follows the conv whose output it takes (pairing the
    norms by call order would swap them: same shapes, different statistics)."""
    pair = tmp_path / "branches.toml"
    code, out, err = run_map(capsys, "pairnets:torch_net(branches=True)", "pairnets:paddle_net(branches=True)", pair)
    assert code == 0, err
    moves = tomllib.loads(pair.read_text())["rules"]["moves"]
    assert ["dense.0", "b3x3"] in moves and ["dense.1", "b3x3_bn"] in moves
    assert ["point.0", "b1x1"] in moves and ["point.1", "b1x1_bn"] in moves
    from converter.fixtures import make_official_checkpoint

    ckpt = make_official_checkpoint(str(pair), tmp_path / "branches.pth")
    code, out, err = cli(capsys, "verify", pair, "--torch-ckpt", ckpt, "--max-err", "1e-5")
    assert code == 0, err


def test_siblings_are_ambiguous_until_stated_by_hand(capsys, nets, tmp_path):
    pair = tmp_path / "qkv.toml"
    args = ("pairnets:torch_net(mixer='siblings')", "pairnets:paddle_net(mixer='siblings')", pair)
    code, out, err = run_map(capsys, *args)
    assert_one_line_error(code, err, "ambiguous", "torch q, k, v", "paddle to_q, to_k, to_v", "[hand]")
    assert not pair.exists()
    pair.write_text('[hand]\nmodules = [["q", "to_q"], ["k", "to_k"], ["v", "to_v"]]\n')
    code, out, err = run_map(capsys, *args)
    assert code == 0, err
    assert "hand edits honoured: 3" in out
    data = tomllib.loads(pair.read_text())
    assert data["hand"]["modules"] == [["q", "to_q"], ["k", "to_k"], ["v", "to_v"]]  # kept for the next run
    assert ["k", "to_k"] in data["rules"]["moves"]


def test_unpaired_module_holding_weights(capsys, nets, tmp_path):
    code, out, err = run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net(extra=True)", tmp_path / "x.toml")
    assert_one_line_error(code, err, "unpaired module", "paddle extra", "no torch counterpart", "[hand]")
    assert "paddle #" in err and "torch  #" in err  # both sides' paths listed


def test_shape_mismatch(capsys, nets, tmp_path):
    code, out, err = run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net(proj_bias=False)", tmp_path / "x.toml")
    assert_one_line_error(code, err, "shape mismatch", "torch proj", "paddle mix")


def test_fused_against_separate_qkv_until_split_by_hand(capsys, nets, tmp_path):
    pair = tmp_path / "fused.toml"
    args = ("pairnets:torch_net(mixer='fused')", "pairnets:paddle_net(mixer='siblings')", pair)
    code, out, err = run_map(capsys, *args)
    assert_one_line_error(code, err, "fused vs separate", "torch qkv", "to_q, to_k, to_v",
                          'splits = [["qkv.weight", ["to_q.weight", "to_k.weight", "to_v.weight"]]]')
    pair.write_text('[hand]\nsplits = [["qkv.weight", ["to_q.weight", "to_k.weight", "to_v.weight"]],\n'
                    '          ["qkv.bias", ["to_q.bias", "to_k.bias", "to_v.bias"]]]\n')
    code, out, err = run_map(capsys, *args)
    assert code == 0, err
    rules = tomllib.loads(pair.read_text())["rules"]
    split = {"source": "qkv.weight", "targets": ["to_q.weight", "to_k.weight", "to_v.weight"], "axis": 0}
    assert split in rules["splits"]
    assert r"^qkv\.weight$" in rules["transposes"]  # each part of a Linear weight is transposed like the whole
    from converter.fixtures import make_official_checkpoint

    ckpt = make_official_checkpoint(str(pair), tmp_path / "fused.pth")
    dst, back = tmp_path / "fused.pdparams", tmp_path / "back.pth"
    assert cli(capsys, "convert", pair, ckpt, dst)[0] == 0
    code, out, err = cli(capsys, "verify", pair, "--torch-ckpt", ckpt, "--paddle-params", dst, "--max-err", "1e-5")
    assert code == 0, err
    assert cli(capsys, "convert", "--reverse", pair, dst, back)[0] == 0
    import torch

    assert torch.equal(torch.load(back)["state_dict"]["qkv.weight"], torch.load(ckpt)["state_dict"]["qkv.weight"])


@pytest.mark.parametrize("torch_spec, fragment", [
    ("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'"),
    ("pairnets:missing", "module 'pairnets' has no attribute 'missing'"),
    ("pairnets:NOT_A_MODEL", "'NOT_A_MODEL' is a int, not a callable"),
    ("pairnets:not_a_model", "returned a builtins.dict, not a torch model"),
    ("pairnets:paddle_net", "returned a paddle model, not a torch model"),
    ("pairnets:torch_net(width=)", "not Python syntax"),
    ("pairnets:torch_net(8)", "by keyword"),
    ("pairnets:torch_net(nonsense=1)", "building the model failed: TypeError"),
    ("paddleclas:ResNet50", "builds a paddle model, but a torch model is needed"),
    ("just-a-name", "expected timm:NAME"),
])
def test_bad_specs_are_one_line(capsys, nets, tmp_path, torch_spec, fragment):
    code, out, err = run_map(capsys, torch_spec, "pairnets:paddle_net", tmp_path / "x.toml")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.toml").exists()


def test_map_keeps_no_file_it_cannot_read(capsys, nets, tmp_path):
    """map rewrites a pair file keeping its [hand]; a file that is not TOML is refused, untouched."""
    out_file = tmp_path / "notes.toml"
    out_file.write_text("these are my notes, not TOML = = =\n")
    code, out, err = run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net", out_file)
    assert_one_line_error(code, err, "exists and is not TOML")
    assert out_file.read_text().startswith("these are my notes")


def test_pair_file_errors_are_one_line(capsys, nets, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pair\n")
    assert_one_line_error(*cli(capsys, "convert", bad, tmp_path / "a.pth", tmp_path / "a.pdparams")[::2],
                          "not a TOML pair file")
    bad.write_text('[pair]\nname = "x"\n')
    assert_one_line_error(*cli(capsys, "convert", bad, tmp_path / "a.pth", tmp_path / "a.pdparams")[::2],
                          "not a valid pair file")
    bad.write_text('[pair]\nname = "fcvit_tiny"\ninput_size = 32\n[torch]\nspec = "pairnets:torch_net"\n'
                   '[paddle]\nspec = "pairnets:paddle_net"\n')
    assert_one_line_error(*cli(capsys, "convert", bad, tmp_path / "a.pth", tmp_path / "a.pdparams")[::2],
                          "model name 'fcvit_tiny' is taken")


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_map_rederives_the_builtin_tables(capsys, tmp_path, restore_registry, name):
    """map on a family's reference and Paddle factories: the same key pairs, transposes and drops
    as the hand-written table, over every key of the reference's state dict."""
    from converter.engine import target_key
    from converter.pairs import load_pair_file
    from converter.registry import get_spec
    from mappings.rules import Transpose

    family = name.rsplit("_", 1)[0]
    pair = tmp_path / f"derived_{name}.toml"
    code, out, err = cli(capsys, "map", f"reference_torch.{family}:{name}", f"paddle_models.{family}:{name}",
                         "-o", pair)
    assert code == 0, err
    spec, derived = get_spec(name), load_pair_file(pair)
    keys = list(spec.create_torch().state_dict())

    def transposed(rules, key):
        return any(r.matches(key) for r in rules if isinstance(r, Transpose))

    assert {k: target_key(k, derived.rules) for k in keys} == {k: target_key(k, spec.rules) for k in keys}
    assert {k for k in keys if transposed(derived.rules, k)} == {k for k in keys if transposed(spec.rules, k)}
    assert any(transposed(spec.rules, k) for k in keys)


PLUGIN = textwrap.dedent('''
    from pathlib import Path


    def pairs():
        return [Path(__file__).parent / "plugged_tiny.toml"]
''')


def test_plugin_pair_shows_in_list_and_verify_all(capsys, nets, tmp_path):
    """A package registering a pair through the torch2paddle.models entry point (a dist-info on
    sys.path, as pip would install it), seen by a fresh process."""
    package = tmp_path / "t2p_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(PLUGIN)
    assert run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net", package / "plugged_tiny.toml")[0] == 0
    dist = tmp_path / "t2p_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: t2p-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[torch2paddle.models]\ntiny = t2p_plugin:pairs\n")
    code, out, err = run_python_with_path(tmp_path, "-m", "converter", "list")
    assert code == 0, err
    assert "plugged_tiny" in out and "pairnets:torch_net -> pairnets:paddle_net" in out
    code, out, err = run_python_with_path(tmp_path, "-m", "converter", "verify", "--all", "--models", "plugged_*",
                                          "--max-err", "1e-5")
    assert code == 0, err
    assert "plugged_tiny" in out and "1 passed, 0 failed" in out


def run_python_with_path(extra, *args):
    """``python ARGS`` in a fresh process with the repository and ``extra`` on its path."""
    import os
    import subprocess

    from conftest import ROOT

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(extra)]))
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def test_verify_all_over_a_directory_of_pairs(capsys, nets, tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    assert run_map(capsys, "pairnets:torch_net", "pairnets:paddle_net", pairs / "tiny_a.toml")[0] == 0
    assert run_map(capsys, "pairnets:torch_net(width=16)", "pairnets:paddle_net(width=16)",
                   pairs / "tiny_b.toml")[0] == 0
    code, out, err = cli(capsys, "verify", "--all", "--pairs", pairs, "--max-err", "1e-5")
    assert code == 0, err
    assert "tiny_a" in out and "tiny_b" in out and "2 passed, 0 failed" in out
