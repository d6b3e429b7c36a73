"""FCViT trains in Paddle as the official code trains it (ma-xu/FCViT @ 77e5a9d, models/fcvit.py).

- ``verify --train`` (converter.train.run_train_verify) on seeded official-format checkpoints of
  fcvit_tiny and the dense fcvit_b12_feat: the loss at every step, every parameter's gradient, the
  weights after 3 SGD-momentum steps, and the BatchNorm running statistics (stem and the three
  downsamplers: 4 BatchNorms that train).
- AdamW, 3 steps: the same pieces (converter.train) with the torch reference also run in float64
  in lockstep, because AdamW turns float32 rounding into whole steps (below).
- Gradients against the exact ones.  run_train_verify passes a gradient within 1e-4 of its RMS or
  3x the reference's own float32-vs-float64 error, measured from torch *float32*.  FCViT's float32
  gradient error is large at stage 0 (the reference's own reaches 1e-3 of the RMS at 224 px: sums over
  56x56 positions), and Paddle's is the same size (median ratio of their errors to the float64
  gradient ~1, 99th percentile 2.5-3.1, over six seeds and sizes), so Paddle vs torch float32 carries
  both and 0-5 of the 488 parameters land beyond 3x by chance.  Those are checked against float64:
  within 10x torch float32's own error (they are at <= 3.7x), with the whole distribution held too.
- Stochastic depth and dropout: the official per-block schedule (models/fcvit.py:374), one DropPath
  on both residual branches and none at rate 0 (350), the channel mixer's dropout after the GELU
  and after fc2 (304, 329-331); the official defaults (every factory: 0 and 0).
- Initialisation as the official ``_init_weights`` / ``cls_init_weights`` leave it, both frameworks.
- Every Paddle BatchNorm is ``numerics.BatchNorm2D`` with torch's momentum 0.1 and eps 1e-5.

AdamW and float32 rounding.  AdamW divides each gradient element by its own running magnitude, so an
element whose gradient sits at the float32 rounding level takes a whole +-lr step in whichever
direction the rounding points, and an element whose gradient is near AdamW's epsilon (1e-8) moves by
an amount its rounding decides.  In FCViT the first kind are the conv biases in front of the four
train-mode BatchNorms (``patch_embed.proj.bias``, ``network.{1,3,5}.proj.bias``: the BatchNorm
subtracts them again, their gradient is exactly 0 -- 1e-17 in float64, 1e-9 in float32), plus the odd
element of any tensor whose gradient (or first moment, after a step or two) sits near zero; the second
kind is common in the dense backbone, whose gradients are small (RMS ~1e-6 for the GlobalContext gate).
Measured at the sizes below (3 AdamW steps, lr 1e-3): the official computation in float32 vs float64
already differs by more than 1e-5 of a tensor's scale in 61 of fcvit_tiny's 488 parameters (873
elements, worst 8.5e-3 relative) and in 88 of fcvit_b12_feat's 456 (1629 elements); Paddle vs torch
float32 in 68 (965 elements, worst 1.3e-2) and 103 (2570 elements).  Once weights part so, the later
losses part too: by 1.4e-7 relative (tiny, step 3) in the reference's own float32 vs float64, up to
2.8e-5 at 112 px.  So AdamW is held to: the step-1 loss and every gradient as for SGD; the later losses
within 1e-5 relative or 3x the reference's own float32-vs-float64 error; every weight element within
1e-5 of its tensor's scale or within the 2 * lr * steps such rounding-driven steps can move it; and per
tensor at most 3x the reference's own count of such elements, plus 2% of the tensor -- so a systematic
difference (a wrong decay set, a wrong epsilon), which moves most of a tensor, cannot hide among them.
SGD has no such amplification: every weight within 1e-5.
"""
import copy
import math

import numpy as np
import paddle
import pytest
import torch

import paddle_models.fcvit as pd_fc
import reference_torch.fcvit as th_fc
from converter.api import convert, create_paddle_model, create_torch_model
from converter.registry import get_spec
from converter.train import (_loss, compare_gradients, make_optimizers, no_weight_decay, parameter_pairs,
                             run_train_verify, zero_stochastic_ops)
from converter.verify import make_batch, prepare_run
from conftest import assert_initialised_as, drop_everything, fresh_states, init_by_module
from model_configs.fcvit import (CONFIGS, DEFAULT_DROP_PATH_RATE, DEFAULT_DROP_RATE, DENSE_CONFIGS,
                                 README_DROP_PATH_RATE)
from paddle_models import layers as pd_layers
from paddle_models.numerics import BatchNorm2D
from reference_torch import layers as th_layers

# Small inputs keep the runs fast (float64 depthwise 11x11 convs are slow on CPU): at 64 px the
# last BatchNorm (network.5) sees 2 x 2 x 2 = 8 values per channel, N / (N - 1) = 8 / 7, so the
# unbiased running-variance update is exercised hard; the dense backbone runs non-square.
TRAIN_CASES = {"fcvit_tiny": 64, "fcvit_b12_feat": (64, 96)}
STEPS, LR, MOMENTUM, WEIGHT_DECAY = 3, 1e-3, 0.9, 0.05  # run_train_verify's defaults
LOSS_REL = 1e-6
WEIGHT_REL = 1e-5
ADAMW_LATER_LOSS_REL = 1e-5  # AdamW steps 2.. (see the module docstring)
STAT_REL = 1e-6  # BatchNorm running statistics: |paddle - torch| <= 1e-6 * max(1, |torch|), per element
NOISE_FACTOR = 3.0
MAX_GRAD_ERR = 1e-4  # run_train_verify's default gate, relative to each gradient's RMS
ACCURACY_FACTOR = 10.0  # a gradient no further from the float64 value than 10x torch float32 is
# The conv biases feeding a train-mode BatchNorm: their gradient is mathematically zero.
PRE_BATCHNORM_BIASES = ("patch_embed.proj.bias", "network.1.proj.bias", "network.3.proj.bias", "network.5.proj.bias")

_runs = {}


def _sgd_report(name, official_checkpoint):
    key = (name, "sgd")
    if key not in _runs:
        _runs[key] = run_train_verify(name, official_checkpoint(name), steps=STEPS, optimizer="sgd", lr=LR,
                                      momentum=MOMENTUM, batch_size=2, input_size=TRAIN_CASES[name])
    return _runs[key]


def _torch_adamw(named_params, lr, weight_decay):
    """torch AdamW with the official no-decay set, as converter.train.make_optimizers builds it."""
    decay = [p for n, p in named_params if not no_weight_decay(n, p.shape)]
    no_decay = [p for n, p in named_params if no_weight_decay(n, p.shape)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-8)


def adamw_lockstep(name, checkpoint, input_size, *, steps=STEPS, lr=LR, weight_decay=WEIGHT_DECAY, seed=0):
    """run_train_verify's AdamW run (same pieces: batch, labels, loss, optimizers, mapping table),
    with the torch reference also trained in float64 alongside: per step the three losses; the
    step-1 gradient comparison; per parameter the weights after the steps in all three."""
    prepared = prepare_run(name, checkpoint, None, batch_size=2, input_size=input_size, seed=seed)
    t_model, p_model = prepared.pair.torch_model, prepared.pair.paddle_model
    t_model.train()
    p_model.train()
    zero_stochastic_ops(t_model, "torch")
    zero_stochastic_ops(p_model, "paddle")
    t64 = copy.deepcopy(t_model).double().train()
    pairs = parameter_pairs(t_model, p_model, prepared.spec.rules)
    t_opt, p_opt = make_optimizers("adamw", pairs, lr, MOMENTUM, weight_decay)
    t64_params = dict(t64.named_parameters())
    t64_opt = _torch_adamw([(n, t64_params[n]) for n, *_ in pairs], lr, weight_decay)
    labels = np.random.default_rng(seed + 1).integers(0, 1000, size=2)
    losses, grads = [], None
    for step in range(steps):
        t_loss = _loss(t_model(torch.from_numpy(prepared.batch)), torch.from_numpy(labels), "torch")
        t64_loss = _loss(t64(torch.from_numpy(prepared.batch.astype(np.float64))), torch.from_numpy(labels), "torch")
        p_loss = _loss(p_model(paddle.to_tensor(prepared.batch)), paddle.to_tensor(labels), "paddle")
        for loss in (t_loss, t64_loss, p_loss):
            loss.backward()
        losses.append((float(t_loss.detach()), float(t64_loss.detach()), float(p_loss)))
        if step == 0:
            grads = compare_gradients(pairs, {n: p.grad.numpy() for n, p in t64_params.items()}, MAX_GRAD_ERR)
            accuracy = {}  # name -> (max |paddle - float64|, max |torch float32 - float64|, RMS)
            for t_name, t_param, _, p_param, transposed in pairs:
                g64 = t64_params[t_name].grad.numpy()
                g_p = p_param.grad.numpy().T if transposed else p_param.grad.numpy()
                accuracy[t_name] = (float(np.abs(g_p - g64).max()), float(np.abs(t_param.grad.numpy() - g64).max()),
                                    float(np.sqrt(np.mean(g64 ** 2))))
            zero_grad_64 = {n: float(np.abs(t64_params[n].grad.numpy()).max()) for n in PRE_BATCHNORM_BIASES}
        for opt in (t_opt, t64_opt):
            opt.step()
            opt.zero_grad()
        p_opt.step()
        p_opt.clear_grad()
    weights = {}
    for t_name, t_param, _, p_param, transposed in pairs:
        w32 = t_param.detach().numpy().astype(np.float64)
        w_p = p_param.numpy().T if transposed else p_param.numpy()
        weights[t_name] = (w32, w_p.astype(np.float64), t64_params[t_name].detach().numpy())
    return {"losses": losses, "grads": grads, "accuracy": accuracy, "weights": weights, "zero_grad_64": zero_grad_64}


def _adamw_run(name, official_checkpoint):
    key = (name, "adamw")
    if key not in _runs:
        _runs[key] = adamw_lockstep(name, official_checkpoint(name), TRAIN_CASES[name])
    return _runs[key]


# ---------------------------------------------------------------------------------------------
# verify --train
# ---------------------------------------------------------------------------------------------

def _unexplained_gradients(run, failed=None) -> list:
    """Parameters whose Paddle gradient fails run_train_verify's gate (1e-4 of its RMS, or 3x the
    reference's own float32 error, both measured against *torch float32*) -- those of ``failed``,
    or of the run's own comparison -- and is also further from the exact (float64) gradient than
    ACCURACY_FACTOR x torch float32's own error."""
    failed = [row["name"] for row in run["grads"] if not row["passed"]] if failed is None else failed
    out = []
    for name in failed:
        paddle_err, torch_err, rms = run["accuracy"][name]
        if paddle_err > ACCURACY_FACTOR * torch_err and paddle_err > MAX_GRAD_ERR * rms:
            out.append((name, paddle_err / max(torch_err, 1e-45), paddle_err / rms))
    return out


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_gradients_are_as_accurate_as_torch_float32(name, official_checkpoint):
    """Step-1 gradients (the same model, batch and loss as run_train_verify's) against the exact
    float64 gradients of the official computation.  Paddle's float32 error is torch float32's: the
    median ratio of the two is ~1 and 95% of the parameters are within 3x.  run_train_verify's gate
    compares Paddle with torch *float32*, whose own error of the same size is then in the
    difference too, so with ~500 parameters a few land beyond its 3x (measured over six seeds and
    sizes: 0-5 parameters, at ratio <= 3.7 to the exact value): those are held to ACCURACY_FACTOR x
    torch float32's own error instead, the report's list is checked to be exactly that set."""
    run = _adamw_run(name, official_checkpoint)
    assert not _unexplained_gradients(run), _unexplained_gradients(run)
    ratios = np.array([p / t for p, t, _ in run["accuracy"].values() if t > 0])
    assert np.median(ratios) <= 1.5 and np.quantile(ratios, 0.95) <= 3.0, (np.median(ratios), np.quantile(ratios, 0.95))
    report = _sgd_report(name, official_checkpoint)  # the same step-1 gradients, through run_train_verify
    failed = [g["name"] for g in report.worst_grads if not g["passed"]]
    assert len(failed) == report.failed_grads <= len(report.worst_grads) // 2, report.format()
    assert not _unexplained_gradients(run, failed), report.format()


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_sgd_steps_match_torch(name, official_checkpoint):
    report = _sgd_report(name, official_checkpoint)
    print(report.format())
    assert all(row["rel_err"] <= LOSS_REL for row in report.losses), report.format()
    # every gradient within run_train_verify's gate, or as accurate as torch float32's own: checked
    # in test_gradients_are_as_accurate_as_torch_float32
    assert report.failed_grads <= 5, report.format()
    assert report.input_grad_rel_err <= 1e-4, report.format()
    assert report.max_rel_weight_err <= WEIGHT_REL, report.worst_weights[:3]
    # the report's running-statistics error is absolute; per element, relative above magnitude 1:
    # test_batchnorm_running_statistics_follow_torch
    assert report.running_stats_err is not None


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_adamw_steps_follow_torch(name, official_checkpoint):
    run = _adamw_run(name, official_checkpoint)
    for step, (t32, t64, p) in enumerate(run["losses"], 1):
        allowed = max((LOSS_REL if step == 1 else ADAMW_LATER_LOSS_REL) * abs(t32), NOISE_FACTOR * abs(t32 - t64))
        assert abs(p - t32) <= allowed, (step, t32, t64, p)
    assert not _unexplained_gradients(run)
    # the conv biases feeding a train-mode BatchNorm get an exactly-zero gradient (rounding only)
    assert max(run["zero_grad_64"].values()) < 1e-12, run["zero_grad_64"]
    for t_name, (w32, w_p, w64) in run["weights"].items():
        scale = max(float(np.abs(w32).max()), 1e-12)
        err = np.abs(w_p - w32)
        off = err > WEIGHT_REL * scale
        assert np.all(err[off] <= 2 * LR * STEPS), (t_name, float(err.max()))
        if t_name in PRE_BATCHNORM_BIASES:
            continue  # every element is rounding noise: only the 2 * lr * steps bound applies
        reference_off = int((np.abs(w32 - w64) > WEIGHT_REL * scale).sum())
        assert off.sum() <= NOISE_FACTOR * reference_off + 3 + 0.02 * off.size, (t_name, int(off.sum()), reference_off)


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_batchnorm_running_statistics_follow_torch(name, official_checkpoint):
    """Three train-mode forwards of the converted pair: every running mean and variance, element by
    element, within 1e-6 of torch's (relative to its magnitude where that exceeds 1: the running
    variances reach ~20 here, where one float32 ulp is ~2e-6).  Paddle's stock BatchNorm2D misses
    by the N / (N - 1) of the unbiased update: the same pair with its layers swapped for stock ones
    is off by far more."""
    spec = get_spec(name)
    result = convert(name, official_checkpoint(name), None)
    t_model = create_torch_model(name, result.checkpoint)
    p_model = create_paddle_model(name, result.state_dict)
    stock = create_paddle_model(name, result.state_dict)
    for layer_name, layer in list(stock.named_sublayers()):
        if isinstance(layer, BatchNorm2D):
            plain = paddle.nn.BatchNorm2D(layer._num_features, momentum=0.9, epsilon=layer._epsilon)
            plain.set_state_dict(layer.state_dict())
            parent = stock.get_sublayer(layer_name.rpartition(".")[0]) if "." in layer_name else stock
            setattr(parent, layer_name.rpartition(".")[2], plain)
    for model in (t_model, p_model, stock):
        model.train()
    for seed in range(3):
        batch, _ = make_batch(spec, batch_size=2, input_size=TRAIN_CASES[name], seed=seed)
        with torch.no_grad():
            t_model(torch.from_numpy(batch))
        with paddle.no_grad():
            p_model(paddle.to_tensor(batch))
            stock(paddle.to_tensor(batch))
    p_state, stock_state = p_model.state_dict(), stock.state_dict()
    checked, stock_worst = 0, 0.0
    for key, value in t_model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        paddle_leaf = {"running_mean": "_mean", "running_var": "_variance"}.get(leaf)
        if paddle_leaf is None:
            continue
        t_value = value.numpy().astype(np.float64)
        scale = np.maximum(1.0, np.abs(t_value))
        err = np.abs(p_state[f"{module}.{paddle_leaf}"].numpy() - t_value) / scale
        assert err.max() <= STAT_REL, (key, err.max())
        stock_worst = max(stock_worst, float((np.abs(stock_state[f"{module}.{paddle_leaf}"].numpy() - t_value)
                                              / scale).max()))
        checked += 1
    assert checked == 2 * 4  # patch_embed.norm, network.{1,3,5}.norm: mean and variance each
    assert stock_worst > 1e-3, stock_worst


@pytest.mark.parametrize("name", ["fcvit_tiny", "fcvit_b12_feat"])
def test_every_paddle_batchnorm_trains_as_torchs(name):
    t_model, p_model = _build(th_fc, name), _build(pd_fc, name)
    t_norms = {n: m for n, m in t_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    p_norms = {n: m for n, m in p_model.named_sublayers() if isinstance(m, paddle.nn.BatchNorm2D)}
    assert set(t_norms) == set(p_norms) == {"patch_embed.norm", "network.1.norm", "network.3.norm", "network.5.norm"}
    for n, t_norm in t_norms.items():
        p_norm = p_norms[n]
        assert type(p_norm) is BatchNorm2D, n
        assert p_norm.torch_momentum == t_norm.momentum == 0.1 and p_norm._epsilon == t_norm.eps == 1e-5


# ---------------------------------------------------------------------------------------------
# Stochastic depth and dropout: official schedule, defaults and placement
# ---------------------------------------------------------------------------------------------

def _build(module, name, **kwargs):
    """The model's structure without spending time on its weights."""
    if module is th_fc:
        with torch.device("meta"):
            return getattr(th_fc, name)(**kwargs)
    with paddle.LazyGuard():
        return getattr(pd_fc, name)(**kwargs)


def _blocks(model):
    named = model.named_modules() if isinstance(model, torch.nn.Module) else model.named_sublayers()
    return [m for _, m in named if type(m).__name__ == "BasicBlock"]


def block_rates(model) -> list:
    """Each block's drop-path rate, in block order (0.0 where the official code has an Identity)."""
    rates = []
    for block in _blocks(model):
        kind = type(block.drop_path).__name__
        assert kind in ("DropPath", "Identity"), kind
        rates.append(float(block.drop_path.drop_prob) if kind == "DropPath" else 0.0)
        assert (kind == "Identity") == (rates[-1] == 0.0)  # official: DropPath only where the rate > 0
    return rates


def official_schedule(rate, layers) -> list:
    """models/fcvit.py:373-374, basic_blocks: rate * (block_idx + sum(layers[:index])) / (sum(layers) - 1)."""
    return [rate * (block_idx + sum(layers[:index])) / (sum(layers) - 1)
            for index in range(len(layers)) for block_idx in range(layers[index])]


@pytest.mark.parametrize("name,rate", [("fcvit_tiny", 0.1), ("fcvit_b12", 0.1), ("fcvit_b24", 0.1), ("fcvit_b48", 0.2),
                                       ("fcvit_b12_feat", 0.3), ("fcvit_b24_feat", 0.1)])
def test_drop_path_rates_are_the_official_schedule(name, rate):
    cfg = {**CONFIGS, **DENSE_CONFIGS}[name]
    expected = official_schedule(rate, list(cfg.layers))
    t_model = _build(th_fc, name, drop_path_rate=rate)
    p_model = _build(pd_fc, name, drop_path_rate=rate)
    t_rates, p_rates = block_rates(t_model), block_rates(p_model)
    assert len(t_rates) == sum(cfg.layers)  # one DropPath per block, shared by both branches
    assert t_rates == p_rates == expected  # exactly: the same Python floats as the official code
    assert t_rates[0] == 0.0 and t_rates[-1] == pytest.approx(rate, rel=1e-15)
    # the shared float32 linspace schedule is the same up to float32 rounding
    shared = [r for stage in th_layers.drop_path_schedule(rate, cfg.layers) for r in stage]
    np.testing.assert_allclose(expected, shared, rtol=0, atol=4 * np.finfo(np.float32).eps * rate)
    for model, layers in ((t_model, th_layers), (p_model, pd_layers)):
        assert all(type(b.drop_path) is layers.DropPath for b in _blocks(model)[1:])  # the shared layer


def test_official_training_defaults():
    """Every official factory and *_feat class leaves drop_rate and drop_path_rate at BaseFormer's
    0.0 (models/fcvit.py:394); the README's ImageNet recipe trains with --drop-path 0.1 / 0.1 / 0.1 /
    0.2 (README.md:97), which the user passes, as train.py does (--drop-path -> drop_path_rate)."""
    assert DEFAULT_DROP_RATE == DEFAULT_DROP_PATH_RATE == 0.0
    assert README_DROP_PATH_RATE == {"fcvit_tiny": 0.1, "fcvit_b12": 0.1, "fcvit_b24": 0.1, "fcvit_b48": 0.2}
    for module in (th_fc, pd_fc):
        for name in [*CONFIGS, *DENSE_CONFIGS]:
            model = _build(module, name)
            assert set(block_rates(model)) == {0.0}
            drops = [m for m in (model.modules() if module is th_fc else model.sublayers())
                     if "Dropout" in type(m).__name__]
            assert len(drops) == len(_blocks(model)) and {d.p for d in drops} == {0.0}


@pytest.mark.parametrize("module", [th_fc, pd_fc], ids=["torch", "paddle"])
def test_factories_take_the_training_kwargs_and_refuse_others(module):
    model = _build(module, "fcvit_tiny", drop_rate=0.2, drop_path_rate=0.1, layer_scale_init_value=1e-3)
    blocks = _blocks(model)
    # the channel mixer's one Dropout (applied after the GELU and after fc2); no other dropout
    drops = [m for m in (model.modules() if module is th_fc else model.sublayers()) if "Dropout" in type(m).__name__]
    assert drops == [b.channel_mixer.drop for b in blocks] and {d.p for d in drops} == {0.2}
    for name in ("fcvit_tiny", "fcvit_b12_feat"):
        with pytest.raises(TypeError, match="attn_drop_rate"):
            _build(module, name, attn_drop_rate=0.1)  # FCViT has no attention dropout
        with pytest.raises(TypeError, match="drop_path"):
            _build(module, name, drop_path=0.1)  # a misspelt keyword is an error, not ignored
    assert _build(module, "fcvit_b12_feat", drop_path_rate=0.2, out_indices=(1, 3)).out_indices == (1, 3)


def test_kwargs_pass_through_the_api():
    t_model = create_torch_model("fcvit_tiny", drop_path_rate=0.1, drop_rate=0.05)
    p_model = create_paddle_model("fcvit_tiny", drop_path_rate=0.1, drop_rate=0.05)
    assert block_rates(t_model) == block_rates(p_model) == official_schedule(0.1, [3, 3, 5, 2])
    assert t_model.network[0][0].channel_mixer.drop.p == p_model.network[0][0].channel_mixer.drop.p == 0.05
    with pytest.raises(TypeError):
        create_paddle_model("fcvit_b12_feat", drop_path=0.1)


def test_drop_path_and_dropout_sit_where_the_official_code_puts_them():
    """A block whose drop path drops everything is the identity (both residual branches go through
    it: models/fcvit.py:358-359); the channel mixer's dropout acts twice, after the GELU and after
    fc2 (329-331); neither changes eval mode."""
    cfg = CONFIGS["fcvit_tiny"]
    x = np.random.default_rng(0).standard_normal((2, 32, 8, 8)).astype(np.float32)
    for module in (th_fc, pd_fc):
        is_torch = module is th_fc
        block = module.BasicBlock(32, 8, cfg, drop=0.0, drop_path=0.5)
        assert type(block.drop_path).__name__ == "DropPath" and block.drop_path.drop_prob == 0.5
        block.drop_path = drop_everything("torch" if is_torch else "paddle")
        block.train()
        inp = torch.from_numpy(x) if is_torch else paddle.to_tensor(x)
        with (torch.no_grad() if is_torch else paddle.no_grad()):
            np.testing.assert_array_equal(block(inp).numpy(), x)
        assert type(module.BasicBlock(32, 8, cfg).drop_path).__name__ == "Identity"  # rate 0: as official
        # dropout: a recording stand-in sees the GELU output, then fc2's output
        mixer = module.ChannelMixer(32, 64, cfg, drop=0.3)
        seen = []

        def record(t, seen=seen):
            seen.append(t.shape[1])
            return t

        mixer.drop.forward = record
        mixer.train()
        mixer(inp)
        assert seen == [64, 32]
    # eval mode: the rates change nothing
    t_plain, t_drop = th_fc.fcvit_tiny(), th_fc.fcvit_tiny(drop_path_rate=0.3, drop_rate=0.3)
    t_drop.load_state_dict(t_plain.state_dict())
    batch = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(t_plain.eval()(batch), t_drop.eval()(batch))
    p_plain, p_drop = pd_fc.fcvit_tiny(), pd_fc.fcvit_tiny(drop_path_rate=0.3, drop_rate=0.3)
    p_drop.set_state_dict(p_plain.state_dict())
    p_plain.eval()
    p_drop.eval()
    with paddle.no_grad():
        np.testing.assert_array_equal(p_plain(paddle.to_tensor(batch.numpy())).numpy(),
                                      p_drop(paddle.to_tensor(batch.numpy())).numpy())


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def fcvit_init(layer_scale: float):
    """Where FCViT's ``_init_weights`` / ``cls_init_weights`` differ from the common pattern: convs
    normal(0, sqrt(2 / fan_out)) with zero bias; layer scales; the GlobalContext rescale 1 / 0."""
    def special(key, module, leaf):
        if leaf.startswith("layer_scale_"):
            return ("const", layer_scale)
        if leaf in ("rescale_weight", "rescale_bias"):
            return ("const", 1.0 if leaf == "rescale_weight" else 0.0)
        if isinstance(module, torch.nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            return ("normal", math.sqrt(2.0 / fan_out)) if leaf == "weight" else ("const", 0.0)
        return None
    return special


@pytest.mark.parametrize("name,layer_scale", [("fcvit_tiny", 1e-5), ("fcvit_b12_feat", 1e-6)])
def test_initialisation_is_the_official_one(name, layer_scale):
    """Built twice from different seeds in each framework: exactly the norm affines, BatchNorm
    statistics, biases, layer scales and GlobalContext rescales are the same both times (at their
    official constants: layer scale 1e-5 for classification, 1e-6 for the *_feat dense models);
    Linear weights are trunc-normal(0.02), conv weights normal(0, sqrt(2 / fan_out)), with the
    sample mean and std of the official distribution within 6 standard errors."""
    with torch.device("meta"):
        structure = getattr(th_fc, name)()
    states = fresh_states(getattr(th_fc, name), getattr(pd_fc, name), get_spec(name).rules)
    assert_initialised_as(states, init_by_module(structure, fcvit_init(layer_scale)))