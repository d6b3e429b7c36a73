"""RegionViT specifics: the padding-and-mask path (any input whose local grid is not ws times
the regional grid; the w14 variants at 224 already), the official mask and its bottom-right
quirk, the wrap-around relative position index, index tables built without loops over
positions, ``proj_cls`` aliasing ``proj``, and strict conversion where the official loader
is lenient."""
import sys

import numpy as np
import paddle
import pytest
import torch

import model_configs.regionvit as tables
import paddle_models.regionvit as pd_rv
import reference_torch.regionvit as th_rv
from converter import convert, create_torch_model
from converter.api import paddle_target_shapes
from converter.engine import MappingError, convert_state_dict
from converter.fixtures import randomize_
from converter.registry import get_spec
from converter.verify import run_verify

from conftest import MAX_ABS_ERR, requires_timm


# ---------------------------------------------------------------------------
# Independent re-derivations of the official tables (IBM/RegionViT @ 77000c2)
# ---------------------------------------------------------------------------

def official_rel_pos_index(ws):
    """attention_variants.py: a (2ws-1) x (2ws-1) table of 0..R^2-1, indexed at
    [dy - y + ws//2, dx - x + ws//2] with Python's negative-index wrap-around."""
    size = 2 * ws - 1
    table = [[r * size + c for c in range(size)] for r in range(size)]
    off = ws // 2
    return np.array([table[dy - y + off][dx - x + off]
                     for y in range(ws) for x in range(ws) for dy in range(ws) for dx in range(ws)])


def official_mask(rows, cols, ws, pad_b, pad_r):
    """regionvit.py convert_to_flatten_layout, step by step: 1 = may attend (per window)."""
    n = 1 + ws * ws
    valid_cols = [1.0] * (ws - pad_r) + [0.0] * pad_r
    right = np.zeros((n, n))
    block = np.zeros((ws, ws))
    block[:ws - pad_r, :ws - pad_r] = 1
    right[1:, 1:] = np.tile(block, (ws, ws))
    right[0, 0] = 1
    right[0, 1:] = valid_cols * ws
    right[1:, 0] = valid_cols * ws
    corner = 1 + ws * (ws - pad_b)
    bottom = np.zeros((n, n))
    bottom[:corner, :corner] = 1
    bottom_right = right.copy()
    bottom_right[:corner, :corner] = 1  # the quirk: opens valid-row keys in padded columns
    mask = np.ones((rows * cols, n, n))
    mask[cols - 1:(rows - 1) * cols:cols] = right  # last column, all rows but the last
    mask[(rows - 1) * cols:] = bottom  # last row
    mask[-1] = bottom_right
    return mask


MASK_CASES = [
    (1, 1, 14, 7, 7),  # w14 at 224, stage 4: 7x7 local tokens in one 14x14 window
    (8, 8, 7, 6, 6),  # tiny at 200, stage 1: 50 -> 56
    (4, 4, 7, 3, 3),
    (2, 2, 7, 1, 1),
    (7, 9, 7, 6, 3),  # tiny at 180x250, stage 1 (non-square)
    (3, 5, 7, 0, 4),  # only right padding
    (5, 3, 7, 2, 0),  # only bottom padding
    (1, 3, 14, 10, 5),
    (2, 2, 7, 7, 7),  # 1conv stem at 29 + 28k pixels: a whole window row/column is padding
]


@pytest.mark.parametrize("ws", [7, 14])
def test_rel_pos_index_is_the_official_wrap_around_table(ws):
    index = tables.rel_pos_index(ws)
    assert np.array_equal(index, official_rel_pos_index(ws))
    if ws == 7:
        assert index[:3].tolist() == [42, 43, 44]  # offset ws // 2; Swin's offset ws - 1 would start at 84
    assert np.array_equal(np.unique(index), np.arange((2 * ws - 1) ** 2))  # every table entry is used


@pytest.mark.parametrize("case", MASK_CASES, ids=[str(c) for c in MASK_CASES])
def test_vectorised_mask_equals_official_construction(case):
    blocked = tables.window_mask(*case)
    assert blocked.dtype == bool
    assert np.array_equal(~blocked, official_mask(*case).astype(bool))


def test_w14_mask_quirk_masks_only_the_padded_corner():
    """w14 at 224, last stage: 7x7 valid tokens padded to 14x14.  A valid query may attend to
    the 49 right-padded and 49 bottom-padded keys; only the 49 corner keys are blocked."""
    blocked = tables.window_mask(1, 1, 14, 7, 7)[0]
    tok = np.arange(196)
    row_pad, col_pad = tok // 14 >= 7, tok % 14 >= 7
    valid = ~row_pad & ~col_pad
    for q in 1 + np.flatnonzero(valid):
        assert np.array_equal(blocked[q, 1:], row_pad & col_pad)
        assert not blocked[q, 0]
    assert blocked[1:, 1:][valid][:, row_pad & ~col_pad].sum() == 0  # bottom padding: attendable
    assert blocked[1:, 1:][valid][:, col_pad & ~row_pad].sum() == 0  # right padding: attendable
    # A corner query has an all-blocked row (uniform attention), as in the official model.
    assert blocked[1 + 13 * 14 + 13].all()


# ---------------------------------------------------------------------------
# Parity through the pad-and-mask path
# ---------------------------------------------------------------------------

@pytest.fixture
def layout_spy(monkeypatch):
    """Records (framework, pad_b, pad_r, mask?) for every flatten in both model files."""
    calls = []

    def spy(module, framework):
        original = module.to_flat_layout

        def record(regional, local, ws):
            out, mask = original(regional, local, ws)
            rows, cols = regional.shape[2:]
            calls.append((framework, rows * ws - local.shape[2], cols * ws - local.shape[3], mask is not None))
            return out, mask
        monkeypatch.setattr(module, "to_flat_layout", record)

    spy(th_rv, "torch")
    spy(pd_rv, "paddle")
    return calls


def test_parity_on_the_pad_and_mask_path(official_checkpoint, tmp_path, layout_spy):
    """regionvit_tiny at 200: stages 1-3 pad (50->56, 25->28, 13->14) and mask; stage 4 does not."""
    src = official_checkpoint("regionvit_tiny")
    dst = tmp_path / "regionvit_tiny.pdparams"
    convert("regionvit_tiny", src, dst)
    report = run_verify("regionvit_tiny", src, dst, batch_size=2, input_size=200, max_err=MAX_ABS_ERR)
    assert report.input_size == 200
    assert report.max_abs_err <= MAX_ABS_ERR, report.format()
    assert report.top1_agreement == 1.0
    per_stage = [(6, 6, True), (3, 3, True), (1, 1, True), (0, 0, False)]
    assert [c[1:] for c in layout_spy if c[0] == "torch"] == per_stage
    assert [c[1:] for c in layout_spy if c[0] == "paddle"] == per_stage


def test_parity_non_square_with_peg(official_checkpoint, layout_spy):
    """A non-square input, different padding per axis, through a PEG variant (which re-pads
    and re-masks after its first block)."""
    name = "regionvit_small_w14_peg"
    result = convert(name, official_checkpoint(name), None)
    t_model = create_torch_model(name, official_checkpoint(name))  # eval mode, loaded strictly
    p_model = pd_rv.regionvit_small_w14_peg()
    missing, unexpected = p_model.set_state_dict({k: paddle.to_tensor(v) for k, v in result.state_dict.items()})
    assert not missing and not unexpected
    p_model.eval()
    x = np.random.default_rng(3).standard_normal((1, 3, 150, 260), dtype=np.float32)
    with torch.no_grad():
        expected = t_model(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        got = p_model(paddle.to_tensor(x)).numpy()
    assert np.abs(expected - got).max() <= MAX_ABS_ERR
    pads = [c[1:3] for c in layout_spy if c[0] == "paddle"]
    assert pads == [c[1:3] for c in layout_spy if c[0] == "torch"]
    assert len({p for p in pads if p[0] != p[1]}) > 0  # bottom and right padding differ


def test_w14_at_224_takes_the_mask_path_and_the_quirk_matters(layout_spy, monkeypatch):
    """The released-weights behaviour: w14 models mask at stage 4 even at 224, and "fixing"
    the mask (blocking every padded key) would change the logits."""
    torch.manual_seed(0)
    model = randomize_(th_rv.regionvit_small_w14(), seed=0).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32))
    with torch.no_grad():
        official = model(x)
    assert [c[1:] for c in layout_spy] == [(0, 0, False), (0, 0, False), (0, 0, False), (7, 7, True)]

    def fixed_mask(rows, cols, ws, pad_b, pad_r):
        tok = np.arange(ws * ws)
        padded = np.concatenate([[False], (tok // ws >= ws - pad_b) | (tok % ws >= ws - pad_r)])
        per_window = padded[None, :] | padded[:, None]
        return np.broadcast_to(per_window, (rows * cols,) + per_window.shape)

    monkeypatch.setattr(th_rv, "window_mask", fixed_mask)
    with torch.no_grad():
        fixed = model(x)
    assert (official - fixed).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------
# Construction: tables vectorised and cached, no loops over positions
# ---------------------------------------------------------------------------

def _lines_run_in(paths, fn):
    """Number of Python lines executed in the files ``paths`` while ``fn()`` runs."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename in paths else None

    sys.settrace(global_)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("module", [th_rv, pd_rv], ids=["torch", "paddle"])
def test_base_w14_builds_its_tables_without_loops_over_positions(module):
    """The official constructor runs ws^4 = 38416 Python iterations per attention (20 of them
    in base_w14).  Ours computes each table once per window size, with numpy."""
    files = (module.__file__, tables.__file__)
    tables.rel_pos_index.cache_clear()
    tables.window_mask.cache_clear()
    assert _lines_run_in(files, lambda: tables.rel_pos_index(14)) < 30
    assert _lines_run_in(files, lambda: tables.window_mask(8, 8, 14, 7, 7)) < 30

    tables.rel_pos_index.cache_clear()
    models = []
    lines = _lines_run_in(files, lambda: models.append(module.regionvit_base_w14()))
    assert lines < 5000  # a loop over the 14^4 position pairs alone would be 38416+
    info = tables.rel_pos_index.cache_info()
    assert (info.misses, info.hits) == (1, 19)  # 20 attention modules, one table
    official = official_rel_pos_index(14)
    model = models[0]
    named = model.named_sublayers() if module is pd_rv else model.named_modules()
    attns = [m for _, m in named if isinstance(m, module.AttentionWithRelPos)]
    assert len(attns) == 20
    for attn in attns:
        assert np.array_equal(np.asarray(attn.rel_pos_index.numpy()), official)


def test_index_tables_are_not_in_the_state_dict():
    t_model = th_rv.regionvit_tiny()
    p_model = pd_rv.regionvit_tiny()
    assert not any("rel_pos_index" in k for k in t_model.state_dict())
    assert not any("rel_pos_index" in k for k in p_model.state_dict())
    assert any(name.endswith("rel_pos_index") for name, _ in t_model.named_buffers())
    assert any(name.endswith("rel_pos_index") for name, _ in p_model.named_buffers())


# ---------------------------------------------------------------------------
# State-dict layout and conversion
# ---------------------------------------------------------------------------

def test_proj_cls_is_proj_in_both_frameworks(official_checkpoint):
    t_model, p_model = th_rv.regionvit_tiny(), pd_rv.regionvit_tiny()
    for i in range(4):
        assert t_model.layers[i].block[0].proj_cls is t_model.layers[i].block[0].proj
        assert p_model.layers[i].block[0].proj_cls is p_model.layers[i].block[0].proj
    t_keys, p_keys = set(t_model.state_dict()), set(p_model.state_dict())
    aliased = {k for k in t_keys if ".proj_cls." in k}
    assert len(aliased) == 12  # 3 downsampling stages x (LayerNorm2d weight, bias; conv weight, bias)
    assert aliased <= p_keys and {k.replace("proj_cls", "proj") for k in aliased} <= p_keys
    converted = convert("regionvit_tiny", official_checkpoint("regionvit_tiny"), None).state_dict
    for key in aliased:
        assert np.array_equal(converted[key], converted[key.replace("proj_cls", "proj")])


def test_rel_pos_and_layernorm2d_are_copied_not_transposed(official_checkpoint):
    src = official_checkpoint("regionvit_tiny")
    official = torch.load(src, weights_only=True)["model"]
    converted = convert("regionvit_tiny", src, None).state_dict
    key = "layers.0.block.1.attn.rel_pos"
    assert converted[key].shape == (2, 169)
    assert np.array_equal(converted[key], official[key].numpy())
    key = "patch_embed.proj.1.weight"
    assert converted[key].shape == (1, 16, 1, 1)
    assert np.array_equal(converted[key], official[key].numpy())
    key = "layers.1.block.0.proj.2.weight"  # depthwise conv with channel multiplier 2
    assert converted[key].shape == (128, 1, 3, 3)
    assert np.array_equal(converted[key], official[key].numpy())
    key = "layers.0.block.1.attn.proj.weight"  # square Linear: transposed by rule
    assert np.array_equal(converted[key], official[key].numpy().T)


def test_layernorm2d_divides_by_a_broadcast_in_dygraph_and_an_expanded_divisor_when_traced():
    """Dygraph keeps the [B, 1, H, W] divisor (correctly rounded, as torch's divide); a traced graph
    divides same-shape operands, which Paddle Inference runs inside oneDNN (3x faster), within an
    ulp or two of the dygraph result.  (Where nothing is recorded, the compiled kernel: the same
    steps from double-precision statistics, tests/test_native.py.)"""
    paddle.seed(3)
    norm = pd_rv.LayerNorm2d(24)
    x = paddle.randn([2, 24, 7, 9]) * 3 + 1
    centred = x - x.mean(1, keepdim=True)
    std = paddle.sqrt((centred * centred).mean(1, keepdim=True) + norm.eps)
    dynamic = norm(x).numpy()  # recording the parameters' gradients: Paddle's ops
    assert np.array_equal(dynamic, (centred / std).numpy())  # weight 1, bias 0
    with paddle.no_grad():
        np.testing.assert_allclose(norm(x).numpy(), dynamic, rtol=1e-6, atol=1e-6)
    traced = paddle.jit.to_static(norm, full_graph=True)
    program = traced.forward.get_concrete_program(x)[0].main_program
    divides = [op for op in program.global_block().ops if op.name() == "pd_op.divide"]
    assert len(divides) == 1
    numerator, divisor = (operand.source().shape for operand in divides[0].operands())
    assert numerator == divisor, (numerator, divisor)
    with paddle.no_grad():
        np.testing.assert_allclose(traced(x).numpy(), dynamic, rtol=3e-7, atol=3e-7)

def _tiny_source():
    return {k: v.numpy() for k, v in th_rv.regionvit_tiny().state_dict().items()}


def _tiny_targets():
    return paddle_target_shapes(get_spec("regionvit_tiny"))


@pytest.mark.parametrize("damage, problem", [
    (lambda sd: sd.update({"layers.0.block.1.attn.rel_pos": sd["layers.0.block.1.attn.rel_pos"].T}),
     "shape mismatch"),
    (lambda sd: sd.update({"patch_embed.proj.1.weight": sd["patch_embed.proj.1.weight"].reshape(-1)}),
     "shape mismatch"),
    (lambda sd: sd.pop("layers.2.block.0.proj_cls.2.weight"), "missing"),
    (lambda sd: sd.update({"layers.0.block.1.attn.rel_pos_index": np.zeros(2401, np.int64)}), "unexpected"),
    (lambda sd: sd.update({"layers.3.peg.weight": np.zeros((512, 1, 3, 3), np.float32)}), "unexpected"),
], ids=["rel_pos transposed", "LayerNorm2d flattened", "proj_cls missing", "stray index", "peg weights"])
def test_conversion_is_strict_where_the_official_loader_is_not(damage, problem):
    """fvcore's Checkpointer skips mismatched shapes and loads non-strictly; we refuse."""
    source = _tiny_source()
    damage(source)
    with pytest.raises(MappingError, match=problem):
        convert_state_dict(source, get_spec("regionvit_tiny").rules, _tiny_targets())


# ---------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------

@requires_timm
def test_official_names_resolve_in_timm():
    import timm

    model = timm.create_model("regionvit_tiny_224", num_classes=10)
    assert isinstance(model, th_rv.RegionViT) and model.head.out_features == 10
    assert isinstance(timm.create_model("regionvit_base_w14_peg"), th_rv.RegionViT)


def test_official_names_resolve_in_registry_and_factories():
    model = th_rv.regionvit_tiny_224(num_classes=10)
    assert isinstance(model, th_rv.RegionViT) and model.head.out_features == 10
    assert get_spec("regionvit_small_w14_peg_224").name == "regionvit_small_w14_peg"
    assert pd_rv.regionvit_tiny_224 is pd_rv.regionvit_tiny
    with pytest.raises(ValueError):
        th_rv.regionvit_tiny(pretrained=True)
