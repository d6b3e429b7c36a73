"""BiFormer dense backbones (biformer_{small,base}_{det,seg}: ``BiFormer_mm`` of rayleizhu/BiFormer
@ 1697bbb, object_detection/ and semantic_segmentation/ models_mm/biformer_mm.py, n_win 16 / 8,
auto_pad=True): the reference's state dict is the official one (manifests), Paddle matches torch
stage by stage at the fixture sizes and at sizes where whole windows are padding, the BRA's
auto_pad is the official one (zeros after norm1, no mask, crop), and the exact top-k ties among
all-padding windows -- which torch and Paddle break differently -- cannot change the output.

Routing near-ties: at n_win 16 a stage-3 router ranks 256 regions, and with random weights two of
them can score within float error of each other at the top-k boundary; the frameworks may then
keep different ones, and the features part from there on.  The parity tests therefore check the routing first (every
difference a tie within the logits' cross-framework error, ``converter.verify.routing_agreement``),
and the features; should a near-tie go the other way, they rerun Paddle routed as torch routed
to tell that apart from a real error, and fail naming it."""
from functools import lru_cache

import numpy as np
import paddle
import pytest
import torch

import mappings.biformer as bf_map
import paddle_models.biformer as pd_bf
import reference_torch.biformer as th_bf
from converter.engine import convert_state_dict
from converter.fixtures import randomize_
from converter.verify import routing_agreement
from model_configs.biformer import CONFIGS, DENSE_CONFIGS

from conftest import load_manifest

DENSE = ("biformer_small_det", "biformer_base_det", "biformer_small_seg", "biformer_base_seg")
FIXTURE_SIZES = ((256, 352), (384, 512))  # the manifests' fixture_input_sizes
# Inputs where most regions of every routed stage are padding only (1x1: all but one of 16x16).
MOSTLY_PADDING = ((1, 1), (37, 75), (20, 100))
# In model order, so each seeded pair is built once: the small ones at both fixture sizes and the
# mostly-padding ones; base_det (the base widths: 3/6/12 routed heads) at the first fixture size.
PARITY_CASES = ([("biformer_small_det", s) for s in FIXTURE_SIZES + MOSTLY_PADDING]
                + [("biformer_base_det", FIXTURE_SIZES[0])]
                + [("biformer_small_seg", s) for s in FIXTURE_SIZES + MOSTLY_PADDING])
def within_gate(err, reference):
    """The dense gate: max abs err <= 1e-5 * max(1, max |feature|)."""
    return err <= 1e-5 * max(1.0, float(np.abs(reference).max()))


def to_paddle(torch_model, paddle_model, rules=bf_map.RULES):
    state, _ = convert_state_dict({k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, rules,
                                  {k: tuple(v.shape) for k, v in paddle_model.state_dict().items()})
    paddle_model.set_state_dict(state)
    return paddle_model


@lru_cache(maxsize=1)  # one pair alive at a time: PARITY_CASES is grouped by model
def seeded_pair(name):
    torch.manual_seed(0)  # randomize_ perturbs the initial weights: fix them too, whatever ran before
    torch_model = randomize_(getattr(th_bf, name)(), seed=0, input_size=224).eval()
    paddle_model = getattr(pd_bf, name)()
    paddle_model.eval()
    return torch_model, to_paddle(torch_model, paddle_model)


def image(h, w, seed=0):
    return torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(seed))


def padding_regions(h_in, w_in, n_win):
    """(n_win^2,) bool: the regions (row-major) that auto_pad fills with padding only."""
    h, w = -(-h_in // n_win), -(-w_in // n_win)  # region size on the padded map
    rows, cols = np.arange(n_win) * h >= h_in, np.arange(n_win) * w >= w_in
    return (rows[:, None] | cols[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Configuration and state dict
# ---------------------------------------------------------------------------------------------

def test_dense_configs_are_the_official_ones():
    for name in DENSE:
        cfg, manifest = DENSE_CONFIGS[name], load_manifest(name)
        kwargs = manifest["official_source"]["backbone_kwargs"]
        assert cfg.auto_pad is kwargs["auto_pad"] is True
        assert cfg.n_win == kwargs["n_win"] == (16 if name.endswith("_det") else 8)
        assert list(cfg.depth) == kwargs["depth"] and list(cfg.embed_dim) == kwargs["embed_dim"] == kwargs["qk_dims"]
        assert list(cfg.topks) == kwargs["topks"] and [cfg.mlp_ratio] * 4 == kwargs["mlp_ratios"]
        assert (cfg.head_dim, cfg.side_dwconv, cfg.pos_embed_kernel) == (
            kwargs["head_dim"], kwargs["side_dwconv"], kwargs["before_attn_dwconv"])
        assert kwargs["kv_downsample_mode"] == "identity" and kwargs["layer_scale_init_value"] == -1
        assert list(manifest["dense"]["out_channels"]) == list(cfg.embed_dim)
        # auto_pad: any non-empty input, non-square and a multiple of nothing
        for h, w in [(256, 352), (384, 512), (1, 1), (37, 75), (1333, 799)]:
            assert cfg.input_problem(h, w) is None
        assert "empty" in cfg.input_problem(0, 32)
    # the classifiers are untouched: no padding, the 7x7 region split is still required
    for name, cfg in CONFIGS.items():
        assert cfg.auto_pad is False and cfg.n_win == 7
        assert cfg.input_problem(256, 224) == cfg.input_size_problem(256, 224) is not None
        assert cfg.input_problem(224, 336) is None


@pytest.mark.parametrize("name", DENSE)
def test_reference_state_dict_is_the_official_one(name):
    manifest = load_manifest(name)
    with torch.device("meta"):  # keys and shapes only
        model = getattr(th_bf, name)()
    state = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert state == [(e["key"], e["shape"]) for e in manifest["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    classifier = {e["key"] for e in load_manifest(name.rsplit("_", 1)[0])["state_dict"]}
    dense_only = {k for k, _ in state} - classifier
    assert dense_only == {f"extra_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert {k.split(".")[0] for k in classifier - {k for k, _ in state}} == {"head", "norm"}
    # the Paddle model's keys are the mapping table's image of these, in the same order
    pd_state = getattr(pd_bf, name)().state_dict()
    shapes = {k: tuple(v.shape) for k, v in pd_state.items()}
    source = {e["key"]: np.zeros(e["shape"], np.float32) for e in manifest["state_dict"]}
    converted, _ = convert_state_dict(source, bf_map.RULES, shapes)
    assert list(converted) == list(pd_state)


def test_model_interface():
    models = []
    for module in (th_bf, pd_bf):
        assert module.DENSE_MODEL is module.BiFormerDense
        model = module.DENSE_MODEL(DENSE_CONFIGS["biformer_small_seg"], out_indices=(1, 3))
        assert model.out_indices == (1, 3)
        assert model.feature_info == [{"channels": 128, "stride": 8}, {"channels": 512, "stride": 32}]
        assert len(model.extra_norms) == 4  # all four, as the official model, whatever is returned
        assert not hasattr(model, "head") and not hasattr(model, "norm")
        models.append(model)
        with pytest.raises(ValueError):
            getattr(module, "biformer_small_det")(pretrained=True)
    with torch.device("meta"):
        full = th_bf.biformer_base_det()
    assert full.out_indices == (0, 1, 2, 3)
    assert full.feature_info == [{"channels": c, "stride": s} for c, s in zip((96, 192, 384, 768), (4, 8, 16, 32))]
    # extra norms: timm LayerNorm2d, eps 1e-6, initialised weight 1 / bias 0 (both frameworks)
    t_model, p_model = models
    for i, dim in enumerate(DENSE_CONFIGS["biformer_small_seg"].embed_dim):
        t_norm, p_norm = t_model.extra_norms[i], p_model.extra_norms[i]
        assert isinstance(t_norm, th_bf.LayerNorm2d) and isinstance(p_norm, pd_bf.LayerNorm2d)
        assert t_norm.eps == p_norm._epsilon == 1e-6 and tuple(t_norm.weight.shape) == (dim,)
        assert torch.all(t_norm.weight == 1) and torch.all(t_norm.bias == 0)
        assert np.all(p_norm.weight.numpy() == 1) and np.all(p_norm.bias.numpy() == 0)
    with torch.no_grad():
        outs = t_model.eval()(image(50, 70))
    assert isinstance(outs, list) and [tuple(o.shape) for o in outs] == [(1, 128, 7, 9), (1, 512, 2, 3)]


def test_classifier_checkpoint_starts_a_dense_backbone():
    """FROM_CLASSIFIER: an ImageNet biformer_small checkpoint fills biformer_small_det; head and
    final BatchNorm dropped, extra norms weight 1 / bias 0 (what the official init leaves them)."""
    classifier = {e["key"]: np.zeros(e["shape"], np.float32) for e in load_manifest("biformer_small")["state_dict"]}
    paddle_model = pd_bf.biformer_small_det()
    state, report = convert_state_dict(classifier,
                                       bf_map.RULES + bf_map.FROM_CLASSIFIER,
                                       {k: tuple(v.shape) for k, v in paddle_model.state_dict().items()})
    assert list(state) == list(paddle_model.state_dict())
    assert sum(report.initialised.values()) == 8
    for i in range(4):
        assert np.all(state[f"extra_norms.{i}.weight"] == 1) and np.all(state[f"extra_norms.{i}.bias"] == 0)


# ---------------------------------------------------------------------------------------------
# Paddle vs torch
# ---------------------------------------------------------------------------------------------

def run_torch(model, x):
    """(features, {router path: (logits, index)}) of one torch forward."""
    routes = {}
    hooks = [model.get_submodule(path).register_forward_hook(
        lambda m, i, o, path=path: routes.__setitem__(path, (o[0].numpy(), o[1].numpy())))
        for path in model.routing_modules]
    try:
        with torch.no_grad():
            features = [t.numpy() for t in model(x)]
    finally:
        for hook in hooks:
            hook.remove()
    return features, routes


def run_paddle(model, x, route_as=None):
    """(features, {router path: (logits, index)}) of one Paddle forward; with ``route_as`` (torch's
    routes) every router records its own top-k, then passes torch's index on."""
    routes = {}

    def hook(path):
        def record(layer, inputs, outputs):
            logits, index = outputs
            routes[path] = (logits.numpy(), index.numpy())
            if route_as is not None:
                return logits, paddle.to_tensor(route_as[path][1])
        return record

    layers = dict(model.named_sublayers())
    hooks = [layers[path].register_forward_post_hook(hook(path)) for path in model.routing_modules]
    try:
        features = [t.numpy() for t in model(paddle.to_tensor(x.numpy()))]
    finally:
        for h in hooks:
            h.remove()
    return features, routes


def real_region_flips(cfg, size, t_routes, p_routes):
    """Rows (router, sample, query region) where the frameworks keep different real regions
    (not ties among all-padding regions: those differ in which padding region only)."""
    hs, ws = cfg.stage_resolutions(size[0]), cfg.stage_resolutions(size[1])
    flips = []
    for path, (_, t_index) in t_routes.items():
        pad = padding_regions(hs[int(path.split(".")[1])], ws[int(path.split(".")[1])], cfg.n_win)
        p_index = p_routes[path][1]
        for row in np.ndindex(t_index.shape[:-1]):
            t_row, p_row = t_index[row], p_index[row]
            if set(t_row[~pad[t_row]]) != set(p_row[~pad[p_row]]) or pad[t_row].sum() != pad[p_row].sum():
                flips.append((path, *row))
    return flips


def check_routing(routers, t_routes, p_routes, where):
    assert set(p_routes) == set(t_routes) == set(routers)
    for path in routers:  # Paddle's top-k on its own logits: a correct top-k within float error
        report = routing_agreement(t_routes[path], p_routes[path])
        assert report["mismatches"] == 0, (where, path, report)


@pytest.mark.parametrize("name,size", PARITY_CASES)
def test_paddle_matches_torch_per_stage(name, size):
    """Per stage, max abs err <= 1e-5 * max(1, max |feature|); every routing difference is a tie
    (among all-padding regions, exact; or within the logits' float error)."""
    torch_model, paddle_model = seeded_pair(name)
    cfg = DENSE_CONFIGS[name]
    x = image(*size)
    expected, t_routes = run_torch(torch_model, x)
    h, w = size
    strides = (4, 8, 16, 32)
    assert [e.shape for e in expected] == [(1, c, -(-h // s), -(-w // s)) for c, s in zip(cfg.embed_dim, strides)]
    actual, p_routes = run_paddle(paddle_model, x)
    errors = [float(np.abs(a - e).max()) for e, a in zip(expected, actual)]
    flips = real_region_flips(cfg, size, t_routes, p_routes)
    if flips:  # a near-tie went the other way: is the port right given the same routing?
        routed, p_routes = run_paddle(paddle_model, x, route_as=t_routes)
        check_routing(torch_model.routing_modules, t_routes, p_routes, (name, size))
        routed_ok = all(within_gate(float(np.abs(a - e).max()), e) for e, a in zip(expected, routed))
        pytest.fail(f"{name} {size}: routing near-ties went the other way at {flips[:3]} ({len(flips)} rows); "
                    f"errors {errors}; with torch's routing the features "
                    f"{'agree, so this is float rounding at a tie, not a port error' if routed_ok else 'DISAGREE'}")
    check_routing(torch_model.routing_modules, t_routes, p_routes, (name, size))
    for stage, (e, err) in enumerate(zip(expected, errors)):
        assert within_gate(err, e), (name, size, stage, err)


# ---------------------------------------------------------------------------------------------
# auto_pad and the ties among all-padding windows, on one BRA
# ---------------------------------------------------------------------------------------------

DIM, HEADS = 64, 2


def bra_pair(n_win, topk, seed=0):
    """A torch BRA with auto_pad and seeded weights (biases too: the padded tokens take them), and
    its Paddle twin with the same weights."""
    gen = torch.Generator().manual_seed(seed)
    t_bra = th_bf.BiLevelRoutingAttention(DIM, HEADS, n_win, topk, side_dwconv=5, auto_pad=True).eval()
    with torch.no_grad():
        for p in t_bra.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim > 1 else 1.0))
    p_bra = pd_bf.BiLevelRoutingAttention(DIM, HEADS, n_win, topk, side_dwconv=5, auto_pad=True)
    p_bra.eval()
    prefix = "stages.0.0.attn."  # the mapping table names the BRA's Linears by their place in the model
    source = {prefix + k: v.numpy() for k, v in t_bra.state_dict().items()}
    shapes = {prefix + k: tuple(v.shape) for k, v in p_bra.state_dict().items()}
    state, _ = convert_state_dict(source, bf_map.RULES, shapes)
    p_bra.set_state_dict({k[len(prefix):]: v for k, v in state.items()})
    return t_bra, p_bra


def naive_padded_bra(bra, x, n_win):
    """The official auto_pad BRA (ops/bra_legacy.py:203-284) written out region by region in
    float64, independently of the reference's layout helpers: pad bottom/right with zeros, no
    mask, route on region means, attend over the routed regions' tokens, LePE on the padded v
    image, output Linear, crop."""
    W_qkv, b_qkv = bra.qkv.qkv.weight.double(), bra.qkv.qkv.bias.double()
    n, h_in, w_in, c = x.shape
    pad_b, pad_r = (-h_in) % n_win, (-w_in) % n_win
    xp = torch.zeros(n, h_in + pad_b, w_in + pad_r, c, dtype=torch.float64)
    xp[:, :h_in, :w_in] = x.double()
    h, w = xp.shape[1] // n_win, xp.shape[2] // n_win
    qkv = xp @ W_qkv.T + b_qkv
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    regions = [(j, i) for j in range(n_win) for i in range(n_win)]

    def tokens(t, r):  # (n, h * w, C) tokens of region r
        j, i = regions[r]
        return t[:, j * h:(j + 1) * h, i * w:(i + 1) * w].reshape(n, h * w, -1)

    scale = c ** -0.5
    q_r = torch.stack([tokens(q, r).mean(1) for r in range(len(regions))], 1)
    k_r = torch.stack([tokens(k, r).mean(1) for r in range(len(regions))], 1)
    index = torch.topk((q_r * scale) @ k_r.transpose(1, 2), bra.router.topk, dim=-1).indices
    out = torch.zeros_like(xp)
    d = c // bra.num_heads
    for b in range(n):
        for r, (j, i) in enumerate(regions):
            keys = torch.cat([tokens(k, int(s))[b] for s in index[b, r]])
            values = torch.cat([tokens(v, int(s))[b] for s in index[b, r]])
            query = tokens(q, r)[b]
            heads = []
            for m in range(bra.num_heads):
                sl = slice(m * d, (m + 1) * d)
                attn = torch.softmax((query[:, sl] * scale) @ keys[:, sl].T, dim=-1)
                heads.append(attn @ values[:, sl])
            out[b, j * h:(j + 1) * h, i * w:(i + 1) * w] = torch.cat(heads, -1).reshape(h, w, c)
    lepe = torch.nn.functional.conv2d(v.permute(0, 3, 1, 2), bra.lepe.weight.double(), bra.lepe.bias.double(),
                                      padding=bra.lepe.padding, groups=c).permute(0, 2, 3, 1)
    out = (out + lepe) @ bra.wo.weight.double().T + bra.wo.bias.double()
    return out[:, :h_in, :w_in]


@pytest.mark.parametrize("n_win,topk,size", [(4, 4, (5, 13)), (8, 1, (9, 3)), (8, 16, (12, 12))])
def test_auto_pad_is_the_official_computation(n_win, topk, size):
    """Against a plain float64 rewrite of the official auto_pad BRA, on maps with whole padding
    windows (5x13 at n_win 4: a row of them; 9x3: most) and a multiple of n_win (no padding)."""
    t_bra, p_bra = bra_pair(n_win, topk)
    x = torch.randn((2, *size, DIM), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = naive_padded_bra(t_bra, x, n_win)
        actual64 = t_bra.double()(x.double())
        t_bra.float()
        actual = t_bra(x)
    assert actual.shape == x.shape
    assert float((actual64 - expected).abs().max()) < 1e-12
    assert float((actual.double() - expected).abs().max()) < 1e-5 * max(1.0, float(expected.abs().max()))
    p_out = p_bra(paddle.to_tensor(x.numpy())).numpy()
    assert within_gate(float(np.abs(p_out - actual.numpy()).max()), actual.numpy())


class _Retie(torch.nn.Module):
    """Wraps a TopkRouting: the same selection with every all-padding region swapped for another
    all-padding region, picked at random."""

    def __init__(self, router, pad, seed):
        super().__init__()
        self.router, self.pad, self.gen = router, torch.from_numpy(pad), torch.Generator().manual_seed(seed)
        self.topk = router.topk

    def forward(self, query, key):
        logits, index = self.router(query, key)
        choices = torch.nonzero(self.pad).flatten()
        swap = self.pad[index]
        picks = choices[torch.randint(len(choices), index.shape, generator=self.gen)]
        return logits, torch.where(swap, picks, index)


def test_ties_among_padding_windows_cannot_change_the_output():
    """The tie argument, checked: every token of an all-padding window is Linear(0) = the qkv
    bias, so all such windows have the same region mean (exact ties in each routing row) and the
    same keys and values; routing to any of them instead of another gives the same output, bit
    for bit.  Torch and Paddle then agree although their top-k break the ties differently (on this
    input torch 2.13 and Paddle 3.3 pick different padding regions for every query region)."""
    n_win, topk, size = 16, 4, (2, 1)  # 2 real regions of 256: every query routes to >= 2 padding ones
    t_bra, p_bra = bra_pair(n_win, topk, seed=1)
    pad = padding_regions(*size, n_win)
    assert pad.sum() == 254
    x = torch.randn((1, *size, DIM), generator=torch.Generator().manual_seed(4))

    captured = {}
    hook = t_bra.router.register_forward_hook(lambda m, i, o: captured.update(logits=o[0], index=o[1]))
    with torch.no_grad():
        expected = t_bra(x)
    hook.remove()
    logits, index = captured["logits"][0], captured["index"][0]
    assert torch.all(logits[:, torch.from_numpy(pad)] == logits[:, torch.from_numpy(pad)][:, :1])  # exact ties
    assert pad[index.numpy()].sum(-1).min() >= topk - 2  # every query takes tied padding regions

    router = t_bra.router
    for seed in range(3):
        t_bra.router = _Retie(router, pad, seed)
        with torch.no_grad():
            assert torch.equal(t_bra(x), expected)
    t_bra.router = router

    p_captured = {}
    p_hook = p_bra.router.register_forward_post_hook(lambda m, i, o: p_captured.update(index=o[1].numpy()))
    p_out = p_bra(paddle.to_tensor(x.numpy())).numpy()
    p_hook.remove()
    assert within_gate(float(np.abs(p_out - expected.numpy()).max()), expected.numpy())
    # same real regions and as many padding ones per query, whichever padding ones each picked
    p_index = p_captured["index"][0]
    for t_row, p_row in zip(index.numpy(), p_index):
        assert set(t_row[~pad[t_row]]) == set(p_row[~pad[p_row]]) and pad[t_row].sum() == pad[p_row].sum()
