"""BiFormer trains in Paddle as the official code trains it (rayleizhu/BiFormer @ 1697bbb).

- ``verify --train`` (converter.train.run_train_verify) on a seeded official-format checkpoint of
  biformer_tiny, biformer_stl (BatchNorm-heavy: stem, every merge and the final norm) and the dense
  biformer_small_seg (whose BatchNorms train, as the official segmentation backbone's do): the loss
  at every step, every parameter's gradient, the weights after 3 SGD-momentum steps and after 3
  AdamW steps, and the BatchNorm running statistics.
- Stochastic depth: the per-block rates are the official schedule (linspace over all blocks), the
  official factories' defaults (0 for the classifiers, the configs' 0.2 / 0.3 / 0.3 / 0.4 for the
  dense backbones), and it sits where the official blocks put it (both residual branches, not the
  position embedding).
- Initialisation as the official ``_init_weights`` and torch's defaults leave it, in both frameworks.
- Every Paddle BatchNorm is ``numerics.BatchNorm2D`` with torch's momentum and eps; the detection
  backbones keep their BatchNorms in eval mode while training (official ``norm_eval=True``).

AdamW after step 1 is not reproducible to 1e-5 by any float32 run, torch's own included, for two
reasons the SGD runs do not have:
- AdamW divides each gradient element by its own magnitude, so an element whose gradient is at the
  float32 rounding level -- conv biases in front of a train-mode BatchNorm, the key third of every
  BRA qkv bias (softmax ignores it), a stage's last MLP bias in front of the next BatchNorm, and the
  odd element of any tensor that happens to sit near zero -- takes a full +-lr step in whichever
  direction its rounding points.  Measured on biformer_tiny (112 px, 3 steps): the reference with 1
  vs 2 torch threads differs in 66 parameters by more than 1e-5 of their scale (worst 1.2e-2), in
  float32 vs float64 in 65 (worst 9e-3); Paddle vs torch in 71 (worst 1.1e-2).
- The weights those steps move feed the next forward's hard top-k routing, where two regions can
  score within float error of each other: on biformer_stl one stage-3 routing row (logit gap 4e-5)
  goes the other way at step 2 and the losses part by 3e-5 (5e-5 relative; 1.9e-4 at step 3).
  Given torch's own gradients, Paddle's AdamW steps keep the losses within 2e-6 (no flip).
So the AdamW runs hold step 1 (loss, every gradient) as tight as SGD, the later losses to 1e-3
relative, and every listed weight to 1e-5 relative or to the 2 * lr * steps that rounding-directed
steps can account for; the SGD runs, free of both effects, hold every weight to 1e-5.
"""
import copy
import re

import numpy as np
import paddle
import pytest
import torch

import paddle_models.biformer as pd_bf
import reference_torch.biformer as th_bf
from converter.api import convert, create_paddle_model, create_torch_model
from converter.engine import convert_state_dict
from converter.registry import get_spec
from converter.train import run_train_verify, zero_stochastic_ops
from converter.verify import make_batch
from conftest import assert_initialised_as, drop_everything, fresh_states, init_by_module
from mappings.biformer import RULES
from mappings.rules import Transpose
from model_configs.biformer import CONFIGS, DENSE_CONFIGS, DENSE_TRAINING
from paddle_models.numerics import BatchNorm2D

# Small inputs keep the runs fast: 112 is the smallest size the classifiers' 7x7 region split takes
# (stage-4 BatchNorm statistics over 2 x 4 x 4 / 2 x 3 x 3 values: N / (N - 1) far from 1, so the
# unbiased running-variance update is exercised hard); the dense backbone pads 96x128 to its windows.
TRAIN_CASES = {"biformer_tiny": 112, "biformer_stl": 112, "biformer_small_seg": (96, 128)}
STEPS, LR = 3, 1e-3
LOSS_REL = 1e-6
WEIGHT_REL = 1e-5
ADAMW_LATER_LOSS_REL = 1e-3  # AdamW steps 2..3 (see the module docstring)
STAT_REL = 1e-6  # BatchNorm running statistics, relative to max(1, |value|)
NOISE_FACTOR = 3.0  # as converter.train: within 3x the reference's own float32-vs-float64 error

_reports = {}


def train_report(name, optimizer, official_checkpoint):
    """One run_train_verify per (model, optimizer), shared by the tests that read it."""
    key = (name, optimizer)
    if key not in _reports:
        _reports[key] = run_train_verify(name, official_checkpoint(name), steps=STEPS, optimizer=optimizer, lr=LR,
                                         batch_size=2, input_size=TRAIN_CASES[name])
    return _reports[key]


def _assert_step1_and_gradients(report):
    assert report.losses[0]["rel_err"] <= LOSS_REL, report.format()
    assert report.failed_grads == 0, report.format()
    assert report.input_grad_rel_err <= 1e-4, report.format()


# ---------------------------------------------------------------------------------------------
# verify --train
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_sgd_steps_match_torch(name, official_checkpoint):
    report = train_report(name, "sgd", official_checkpoint)
    print(report.format())
    _assert_step1_and_gradients(report)
    assert all(row["rel_err"] <= LOSS_REL for row in report.losses), report.format()
    assert report.max_rel_weight_err <= WEIGHT_REL, report.worst_weights[:3]
    assert report.running_stats_err is not None  # every tested variant has BatchNorms
    assert report.passed


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_adamw_steps_follow_torch(name, official_checkpoint):
    report = train_report(name, "adamw", official_checkpoint)
    print(report.format())
    _assert_step1_and_gradients(report)
    assert all(row["rel_err"] <= ADAMW_LATER_LOSS_REL for row in report.losses), report.format()
    # every listed weight within 1e-5 relative, or within what rounding-directed AdamW steps move it
    for row in report.worst_weights:
        assert row["rel_err"] <= WEIGHT_REL or row["max_abs_err"] <= 2 * LR * STEPS, row


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl", "biformer_small_seg"])
def test_batchnorm_running_statistics_follow_torch(name, official_checkpoint):
    """Three train-mode forwards of the converted pair: every running mean and variance within 1e-6
    of torch's, relative to max(1, |value|) element by element (running variances reach ~1e2 here,
    where one float32 ulp is ~1e-5) -- or, like a gradient, within 3x the reference's own
    float32-vs-float64 error on that statistic: the deepest maps' batch means hold cancellation
    (the dense backbone's stage-4 mean of 24 values).  Paddle's stock BatchNorm2D would miss by the
    N / (N - 1) of the unbiased update (tests/test_train.py)."""
    spec = get_spec(name)
    result = convert(name, official_checkpoint(name), None)
    t_model = create_torch_model(name, result.checkpoint)
    p_model = create_paddle_model(name, result.state_dict)
    t64 = copy.deepcopy(t_model).double()
    for model in (t_model, t64):
        model.train()
        zero_stochastic_ops(model, "torch")
    p_model.train()
    zero_stochastic_ops(p_model, "paddle")
    for seed in range(3):
        batch, _ = make_batch(spec, batch_size=2, input_size=TRAIN_CASES[name], seed=seed)
        with torch.no_grad():
            t_model(torch.from_numpy(batch))
            t64(torch.from_numpy(batch.astype(np.float64)))
        with paddle.no_grad():
            p_model(paddle.to_tensor(batch))
    p_state, t64_state = p_model.state_dict(), t64.state_dict()
    checked = 0
    for key, value in t_model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        paddle_leaf = {"running_mean": "_mean", "running_var": "_variance"}.get(leaf)
        if paddle_leaf is None:
            continue
        t_value = value.numpy().astype(np.float64)
        p_value = p_state[f"{module}.{paddle_leaf}"].numpy().astype(np.float64)
        err = np.abs(p_value - t_value)
        noise = np.abs(t_value - t64_state[key].numpy()).max()
        assert (err / np.maximum(1.0, np.abs(t_value))).max() <= STAT_REL or err.max() <= NOISE_FACTOR * noise, \
            (key, err.max(), noise)
        checked += 1
    assert checked == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in t_model.modules()) > 0


# ---------------------------------------------------------------------------------------------
# Stochastic depth: official schedule, defaults and placement
# ---------------------------------------------------------------------------------------------

def block_rates(model) -> list:
    """Each block's drop-path rate, in block order (0 where the official code puts an Identity)."""
    named = model.named_modules() if isinstance(model, torch.nn.Module) else model.named_sublayers()
    return [float(getattr(m, "drop_prob", 0.0)) for n, m in named if n.endswith(".drop_path")]


def official_schedule(rate, depth) -> list:
    """biformer.py:213 / biformer_stl.py:160: [x.item() for x in torch.linspace(0, rate, sum(depth))]."""
    return [x.item() for x in torch.linspace(0, rate, sum(depth))]


def _build(module, name, **kwargs):
    if module is th_bf:
        with torch.device("meta"):  # module structure only
            return getattr(th_bf, name)(**kwargs)
    with paddle.LazyGuard():
        return getattr(pd_bf, name)(**kwargs)


@pytest.mark.parametrize("name,rate", [("biformer_tiny", 0.3), ("biformer_stl", 0.1), ("biformer_stl_nchw", 0.2),
                                       ("biformer_small_det", None), ("biformer_small_seg", None),
                                       ("biformer_base_seg", None)])
def test_drop_path_rates_are_the_official_schedule(name, rate):
    dense = name in DENSE_CONFIGS
    cfg = (DENSE_CONFIGS if dense else CONFIGS)[name]
    expected_rate = DENSE_TRAINING[name]["drop_path_rate"] if dense else rate
    kwargs = {} if dense else {"drop_path_rate": rate}
    expected = official_schedule(expected_rate, cfg.depth)
    t_rates = block_rates(_build(th_bf, name, **kwargs))
    p_rates = block_rates(_build(pd_bf, name, **kwargs))
    assert len(t_rates) == len(p_rates) == sum(cfg.depth)  # one (shared by both branches) per block
    assert t_rates == expected
    # the shared Paddle schedule is np.linspace in float32: at most one float32 ulp from torch.linspace
    np.testing.assert_allclose(p_rates, expected, rtol=0, atol=np.finfo(np.float32).eps * expected_rate)
    assert t_rates[0] == p_rates[0] == 0.0 and abs(p_rates[-1] - expected_rate) < 1e-7


def test_official_training_defaults():
    """The official factories build the classifiers with drop_path_rate 0 (an Identity in every
    block); the dense configs set 0.2 / 0.3 (COCO) and 0.3 / 0.4 (ADE20K UperNet)."""
    for module in (th_bf, pd_bf):
        for name in CONFIGS if module is th_bf else ("biformer_tiny", "biformer_stl_nchw"):  # Paddle: both classes
            model = _build(module, name)
            assert model.drop_path_rate == 0.0 and model.drop_rate == 0.0
            assert set(block_rates(model)) == {0.0}
        for name, rate in (("biformer_small_det", 0.2), ("biformer_base_det", 0.3), ("biformer_small_seg", 0.3),
                           ("biformer_base_seg", 0.4)):
            if module is pd_bf and "base" in name:
                continue  # the same framework-free dense_factory_kwargs; the rates are read off in the test above
            model = _build(module, name)
            assert model.drop_path_rate == rate == DENSE_TRAINING[name]["drop_path_rate"]
            assert model.norm_eval is name.endswith("_det")
            assert _build(module, name, drop_path_rate=0.05).drop_path_rate == 0.05


@pytest.mark.parametrize("module", [th_bf, pd_bf], ids=["torch", "paddle"])
def test_factories_take_the_official_kwargs_and_refuse_others(module):
    model = _build(module, "biformer_tiny", drop_rate=0.2, drop_path_rate=0.1, in_chans=1)
    assert model.drop_rate == 0.2  # accepted, as the official model accepts it; it has no dropout
    assert not [n for n, m in (model.named_modules() if module is th_bf else model.named_sublayers())
                if "Dropout" in type(m).__name__]
    for name in ("biformer_tiny", "biformer_stl_nchw", "biformer_small_seg"):
        with pytest.raises(TypeError, match="attn_drop_rate"):
            _build(module, name, attn_drop_rate=0.1)  # the official models have no such argument
    with pytest.raises(TypeError, match="norm_eval"):
        _build(module, "biformer_small_seg", norm_eval=False)  # only the detection class has it
    with pytest.raises(TypeError, match="disable_bn_grad"):
        _build(module, "biformer_base_seg", disable_bn_grad=True)
    assert _build(module, "biformer_small_det", norm_eval=False, disable_bn_grad=False).norm_eval is False


@pytest.mark.parametrize("layout", ["biformer", "stl", "stl_nchw"])
def test_drop_path_sits_on_both_residual_branches(layout):
    """With the drop path dropping everything, a block reduces to its skip connections: the main
    models keep the position-embedding conv (x + pos_embed(x)), the STL blocks return x."""
    cfg = CONFIGS[{"biformer": "biformer_tiny", "stl": "biformer_stl", "stl_nchw": "biformer_stl_nchw"}[layout]]
    dim, topk = 64, 1
    x = np.random.default_rng(0).standard_normal((2, dim, 14, 14)).astype(np.float32)
    for module in (th_bf, pd_bf):
        block_cls = module.Block if layout == "biformer" else module.BiFormerBlock
        block = block_cls(cfg, dim, topk, drop_path=0.5)
        assert type(block.drop_path).__name__ == "DropPath" and block.drop_path.drop_prob == 0.5
        block.drop_path = drop_everything("torch" if module is th_bf else "paddle")
        if module is th_bf:
            block.train()
            inp = torch.from_numpy(x if layout != "stl" else x.transpose(0, 2, 3, 1).copy())
            with torch.no_grad():
                out = block(inp).numpy()
                skip = (inp + block.pos_embed(inp)).numpy() if layout == "biformer" else inp.numpy()
        else:
            block.train()
            inp = paddle.to_tensor(x if layout != "stl" else x.transpose(0, 2, 3, 1).copy())
            with paddle.no_grad():
                out = block(inp).numpy()
                skip = (inp + block.pos_embed(inp)).numpy() if layout == "biformer" else inp.numpy()
        np.testing.assert_allclose(out, skip, rtol=0, atol=1e-6)
    assert block_cls(cfg, dim, topk).drop_path.__class__.__name__ == "Identity"  # rate 0: as official


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl_nchw"])
def test_initialisation_is_the_official_one(name):
    """Built twice from different seeds in each framework: exactly the norm affines, BatchNorm
    statistics and Linear biases are the same both times (at their official constants); Linear
    weights are trunc-normal(0.02), conv weights and biases U(+-1/sqrt(fan_in)), with the sample
    mean and std of the official distribution within 6 standard errors."""
    with torch.device("meta"):
        structure = getattr(th_bf, name)()
    # biformer_stl_nchw is no registered model: its MLPs are 1x1 convs where the family table's
    # transposes name Linear weights, so the table is restated with one transpose per actual Linear
    linear = [f"{n}.weight" for n, m in structure.named_modules() if isinstance(m, torch.nn.Linear)]
    rules = tuple(r for r in RULES if not isinstance(r, Transpose)) + tuple(Transpose(rf"^{re.escape(k)}$")
                                                                            for k in linear)
    states = fresh_states(getattr(th_bf, name), getattr(pd_bf, name), rules)
    assert_initialised_as(states, init_by_module(structure))  # the common pattern, nothing special


def test_layer_scale_when_configured():
    """No official variant has layer scale (layer_scale_init_value=-1 everywhere); configured, both
    frameworks add gamma1 / gamma2 at the init value on both residual branches."""
    from dataclasses import replace

    cfg = replace(CONFIGS["biformer_tiny"], layer_scale_init_value=0.5)
    x = np.random.default_rng(0).standard_normal((1, 64, 14, 14)).astype(np.float32)
    t_block = th_bf.Block(cfg, 64, 1).eval()
    p_block = pd_bf.Block(cfg, 64, 1)
    p_block.eval()
    assert [k for k in t_block.state_dict() if "gamma" in k] == ["gamma1", "gamma2"]
    assert torch.all(t_block.gamma1 == 0.5) and np.all(p_block.gamma2.numpy() == 0.5)
    prefix = "stages.0.0."  # the table's patterns name Linears by their path inside the model
    state, _ = convert_state_dict({prefix + k: v.numpy() for k, v in t_block.state_dict().items()}, RULES,
                                  {prefix + k: tuple(v.shape) for k, v in p_block.state_dict().items()})
    p_block.set_state_dict({k[len(prefix):]: v for k, v in state.items()})
    with torch.no_grad():
        expected = t_block(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        np.testing.assert_allclose(p_block(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=1e-5)
    assert not [k for k in th_bf.Block(CONFIGS["biformer_tiny"], 64, 1).state_dict() if "gamma" in k]


# ---------------------------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl", "biformer_stl_nchw", "biformer_small_det"])
def test_every_paddle_batchnorm_trains_as_torchs(name):
    t_model = _build(th_bf, name)
    p_model = _build(pd_bf, name)
    t_norms = {n: m for n, m in t_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    p_norms = {n: m for n, m in p_model.named_sublayers() if isinstance(m, paddle.nn.BatchNorm2D)}
    assert set(t_norms) == set(p_norms) and len(t_norms) == (6 if name == "biformer_tiny" else 5)
    for n, t_norm in t_norms.items():
        p_norm = p_norms[n]
        assert type(p_norm) is BatchNorm2D, n
        assert p_norm.torch_momentum == t_norm.momentum == 0.1 and p_norm._epsilon == t_norm.eps == 1e-5


def _small_dense(module, **kwargs):
    from dataclasses import replace

    cfg = replace(DENSE_CONFIGS["biformer_small_det"], depth=(1, 1, 1, 1))
    return module.BiFormerDense(cfg, **kwargs)


def test_detection_backbone_keeps_batchnorm_frozen_while_training():
    """Official BiFormer_mm (detection), norm_eval=True: train() leaves the BatchNorms in eval mode,
    so a training forward normalises with the running statistics and leaves them as they are;
    disable_bn_grad freezes their affine weights.  The segmentation backbone's BatchNorms train."""
    x = np.random.default_rng(0).standard_normal((2, 3, 40, 56)).astype(np.float32)
    for module in (th_bf, pd_bf):
        is_torch = module is th_bf
        model = _small_dense(module, norm_eval=True)
        model.train()
        layers = list(model.modules() if is_torch else model.sublayers())
        norms = [m for m in layers if isinstance(m, torch.nn.BatchNorm2d if is_torch else paddle.nn.BatchNorm2D)]
        assert len(norms) == 5 and not any(m.training for m in norms)
        assert model.training and all(m.training for m in layers if m not in norms)
        before = [(m.running_mean if is_torch else m._mean).numpy().copy() for m in norms]
        if is_torch:
            model(torch.from_numpy(x))
        else:
            model(paddle.to_tensor(x))
        after = [(m.running_mean if is_torch else m._mean).numpy() for m in norms]
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
        model.eval()
        assert not any(m.training for m in layers)
        # without norm_eval (the segmentation backbone) they train
        trained = _small_dense(module)
        trained.train()
        assert all(m.training for m in (trained.modules() if is_torch else trained.sublayers()))
        frozen = _small_dense(module, disable_bn_grad=True)
        for m in (frozen.modules() if is_torch else frozen.sublayers()):
            if isinstance(m, torch.nn.BatchNorm2d):
                assert not m.weight.requires_grad and not m.bias.requires_grad
            elif isinstance(m, paddle.nn.BatchNorm2D):
                assert m.weight.stop_gradient and m.bias.stop_gradient
