"""BiFormer specifics: the hard top-k routing agrees between the frameworks (hooked through the
models' ``routing_modules``), near-ties are told apart from real routing errors, the routed
key/value gather copies topk regions per query region instead of all p^2, input sizes the
7x7 region split cannot take fail up front with a clear error, biformer_stl /
biformer_stl_nchw (same key names, different module types) get different mapping tables, and
every sub-module has a twin of the same name and output shapes in the other framework."""
import os
import textwrap

import numpy as np
import paddle
import pytest
import torch

import paddle_models.biformer as pd_bf
import reference_torch.biformer as th_bf
from converter.api import convert, create_paddle_model, create_torch_model
from converter.errors import UserError
from converter.registry import get_spec
from converter.verify import routing_agreement, make_batch, run_models
from mappings.rules import Transpose
from model_configs.biformer import CONFIGS

from conftest import run_python


# ---------------------------------------------------------------------------
# Routing agreement
# ---------------------------------------------------------------------------

def converted_pair(name, checkpoint):
    result = convert(name, checkpoint, None)
    return create_torch_model(name, result.checkpoint), create_paddle_model(name, result.state_dict)


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl_nchw"])  # legacy and NCHW routers
def test_routing_indices_agree_between_frameworks(name, official_checkpoint):
    torch_model, paddle_model = converted_pair(name, official_checkpoint(name))
    routers = torch_model.routing_modules
    cfg = CONFIGS[name]
    assert routers == paddle_model.routing_modules
    assert len(routers) == sum(d for d, k in zip(cfg.depth, cfg.topks) if k > 0)

    batch, _ = make_batch(get_spec(name), batch_size=2, seed=0)
    run = run_models(torch_model, paddle_model, batch, "cpu", routers)
    for router in routers:
        (t_logits, t_index), (p_logits, p_index) = run["torch_stages"][router], run["paddle_stages"][router]
        topk = torch_model.get_submodule(router).topk
        assert t_index.shape == p_index.shape == (2, 49, topk) and t_index.dtype == p_index.dtype == np.int64
        assert t_logits.shape == (2, 49, 49)
        # the batch really routes: query regions do not all pick the same key regions
        assert len({tuple(sorted(r)) for r in t_index.reshape(-1, topk)}) > 1
        report = routing_agreement((t_logits, t_index), (p_logits, p_index))
        assert report["identical"] == report["rows"], (router, report)


def test_routing_agreement_tells_near_ties_from_errors():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 4, 6)).astype(np.float32)
    logits[0, 2, 3] = logits[0, 2, 5] = 2.0  # row 2: regions 3 and 5 tie for the top
    index = np.argsort(-logits, -1)[..., :1]
    assert index[0, 2, 0] == 3
    noisy = logits + np.float32(3e-7) * rng.standard_normal(logits.shape).astype(np.float32)
    flipped = index.copy()
    flipped[0, 2, 0] = 5  # the other framework broke the tie the other way
    report = routing_agreement((logits, index), (noisy, flipped))
    assert (report["identical"], report["ties"], report["mismatches"]) == (3, 1, 0)
    wrong = index.copy()
    wrong[0, 1, 0] = np.argsort(logits[0, 1])[0]  # the worst region: a real routing error
    report = routing_agreement((logits, index), (noisy, wrong))
    assert (report["identical"], report["ties"], report["mismatches"]) == (3, 0, 1)
    assert report["max_gap"] > 0.1


# ---------------------------------------------------------------------------
# The routed gather: topk regions per query region, never p^2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("module", [th_bf, pd_bf], ids=["torch", "paddle"])
def test_kv_gather_equals_indexing_the_selected_regions(module):
    rng = np.random.default_rng(0)
    heads, n, p, tokens, d, topk = 2, 3, 9, 4, 5, 3
    k, v = (rng.standard_normal((heads, n * p, tokens, d)).astype(np.float32) for _ in range(2))
    index = np.stack([rng.permutation(p)[:topk] for _ in range(n * p)]).reshape(n, p, topk)
    to = torch.from_numpy if module is th_bf else paddle.to_tensor
    got_k, got_v = (t.numpy() for t in module.KVGather()(to(index), to(k), to(v)))
    for src, got in ((k, got_k), (v, got_v)):
        expected = src.reshape(heads, n, p, tokens, d)[:, np.arange(n)[:, None, None], index]  # (h, n, p, topk, t, d)
        assert np.array_equal(got, expected.reshape(heads, n * p, topk * tokens, d))


@pytest.mark.parametrize("n_win,topk", [(8, 1), (8, 4), (16, 4)])
def test_paddle_bra_gathers_topk_regions_not_all(n_win, topk):
    """One BRA forward on a 64x64 map: what the gather hands to the attention holds exactly topk
    regions per query region, and its size does not depend on the number of regions p^2."""
    dim, heads, side = 64, 2, 64
    bra = pd_bf.BiLevelRoutingAttention(dim, heads, n_win, topk, side_dwconv=5)
    bra.eval()
    shapes = []
    bra.kv_gather.register_forward_post_hook(lambda layer, inputs, out: shapes.append([t.shape for t in out]))
    x = paddle.randn([1, side, side, dim])
    with paddle.no_grad():
        assert bra(x).shape == [1, side, side, dim]
    tokens = (side // n_win) ** 2
    expected = [heads, n_win * n_win, topk * tokens, dim // heads]
    assert shapes == [[expected, expected]]
    assert np.prod(expected) == side * side * topk * dim  # H * W * topk * C: no factor p^2


MEMORY_PROBE = textwrap.dedent("""
    import sys
    import paddle
    import paddle_models.biformer as bf
    n_win, topk, side, dim = map(int, sys.argv[1:])
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with paddle.no_grad():
        warm = bf.BiLevelRoutingAttention(dim, 2, 2, 1, 5)
        warm.eval()
        warm(paddle.randn([1, 8, 8, dim]))  # load the kernels the big forward will use
        bra = bf.BiLevelRoutingAttention(dim, 2, n_win, topk, 5)
        bra.eval()
        x = paddle.randn([1, side, side, dim])
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
        bra(x)
        print(status("VmHWM") - before)
""")


def bra_peak_bytes(n_win, topk, side, dim):
    _, out, _ = run_python("-c", MEMORY_PROBE, n_win, topk, side, dim, check=True)
    return int(out.split()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux peak-RSS reset")
def test_paddle_bra_peak_memory_grows_with_topk_not_p_squared():
    """Peak memory of one BRA forward on a 64x64x64 map (fresh process per setting): quadrupling
    the region count p^2 at the same topk leaves it flat, and it stays far below what expanding
    the keys and values to (n, p^2, p^2, w^2, c) would take (537 MB at p = 16); raising topk is
    what makes it grow (measured: 17 / 35 / 107 MiB for topk 1 / 4 / 16 at p = 8)."""
    side, dim = 64, 64
    expanded = 16 ** 2 * side * side * 2 * dim * 4  # bytes of the seed ports' expand at p = 16
    peak = {(p, k): bra_peak_bytes(p, k, side, dim) for p, k in ((8, 4), (16, 4), (8, 16))}
    assert peak[16, 4] < expanded / 8, (peak, expanded)
    assert peak[16, 4] < 1.5 * peak[8, 4] + 16 * 2 ** 20, peak
    assert peak[8, 16] > 2 * peak[8, 4], peak


# ---------------------------------------------------------------------------
# Input sizes
# ---------------------------------------------------------------------------

def test_registry_rejects_sizes_that_are_not_multiples_of_112():
    for name in ("biformer_small", "biformer_stl_nchw"):
        spec = get_spec(name)
        spec.check_input_size(224, 448)
        with pytest.raises(UserError, match=r"256x224 is not a multiple of 112"):
            spec.check_input_size(256, 224)


def test_stage_resolutions_follow_each_layout():
    assert CONFIGS["biformer_small"].stage_resolutions(224) == (56, 28, 14, 7)
    assert CONFIGS["biformer_stl"].stage_resolutions(224) == (56, 28, 14, 7)
    # 3x3/2 convs round up, the 4x4/4 patchify rounds down: 222 still gives 56 in the main models
    assert CONFIGS["biformer_tiny"].stage_resolutions(222) == (56, 28, 14, 7)
    assert CONFIGS["biformer_stl"].stage_resolutions(222) == (55, 27, 13, 6)
    for name, cfg in CONFIGS.items():
        assert cfg.input_size_problem(224, 336) is None, name
        assert "stage 1" in cfg.input_size_problem(256, 224), name


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl_nchw"])
@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_model_rejects_input_it_cannot_split_before_computing(name, framework):
    stem_calls = []
    if framework == "torch":
        model = getattr(th_bf, name)().eval()
        model.downsample_layers[0].register_forward_pre_hook(lambda *a: stem_calls.append(1))
        x, guard = torch.zeros(1, 3, 256, 256), torch.no_grad()
    else:
        model = getattr(pd_bf, name)()
        model.eval()
        model.downsample_layers[0].register_forward_pre_hook(lambda *a: stem_calls.append(1))
        x, guard = paddle.zeros([1, 3, 256, 256]), paddle.no_grad()
    with guard, pytest.raises(ValueError, match=r"input 256x256 gives a 64x64 feature map at stage 1.*multiples of 112"):
        model(x)
    assert stem_calls == []


# ---------------------------------------------------------------------------
# Mapping tables
# ---------------------------------------------------------------------------

def test_stl_variants_need_their_own_tables():
    """The same key is an nn.Linear weight in biformer_stl and a 1x1 conv in biformer_stl_nchw, so a
    table naming keys can only be right per variant; each variant's table transposes exactly its
    model's nn.Linear weights."""
    models = {name: getattr(th_bf, name)() for name in ("biformer_stl", "biformer_stl_nchw")}
    shared = "stages.3.blocks.0.attn.qkv.weight"
    assert models["biformer_stl"].state_dict()[shared].ndim == 2
    assert models["biformer_stl_nchw"].state_dict()[shared].ndim == 4
    for name, model in models.items():
        linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        transposes = [r for r in get_spec(name).rules if isinstance(r, Transpose)]
        assert {k for k in model.state_dict() if any(t.matches(k) for t in transposes)} == linear, name


# ---------------------------------------------------------------------------
# Sub-module pairing (what ``diff`` hooks)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl", "biformer_stl_nchw"])
def test_every_sub_module_pairs_up_with_equal_output_shapes(name):
    """Both frameworks have the same sub-module names, and each pair returns tensors of the same
    shapes (the Paddle BRA reorders its internal layout work, never a module's interface)."""
    shapes = {}

    def recorder(store, key):
        def hook(module, inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            store[key] = [tuple(t.shape) for t in outs]
        return hook

    torch_model = getattr(th_bf, name)().eval()
    paddle_model = getattr(pd_bf, name)()
    paddle_model.eval()
    torch_names = {n for n, _ in torch_model.named_modules() if n}
    paddle_layers = dict(paddle_model.named_sublayers())
    assert torch_names == set(paddle_layers)
    for framework, modules in (("torch", dict(torch_model.named_modules())), ("paddle", paddle_layers)):
        shapes[framework] = {}
        for n in torch_names:
            hook = recorder(shapes[framework], n)
            if framework == "torch":
                modules[n].register_forward_hook(hook)
            else:
                modules[n].register_forward_post_hook(hook)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    with torch.no_grad():
        torch_model(torch.from_numpy(x))
    with paddle.no_grad():
        paddle_model(paddle.to_tensor(x))
    never_called = torch_names - set(shapes["torch"])
    assert all(isinstance(torch_model.get_submodule(n), torch.nn.ModuleList) for n in never_called)
    assert shapes["torch"] == shapes["paddle"]
