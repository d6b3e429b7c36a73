"""RegionViT dense backbones (official IBM/RegionViT @ 77000c2, detection/detector_wrapper.py
RegionViTBackbone around the classifier built with det_norm=True): state dicts against the
manifests, Paddle vs torch per stage at the manifests' fixture sizes, and the official input
handling at dense sizes: the regional stem's symmetric padding (an axis that is already a
multiple of 4 * ws still gains a whole patch when the other is not), the local tokens'
bottom/right padding and mask, and the mask's bottom-right-window quirk (OR where AND was
meant)."""
import copy
import json

import numpy as np
import paddle
import pytest
import torch

import mappings.regionvit as rv_map
import model_configs.regionvit as tables
import paddle_models.regionvit as pd_rv
import reference_torch.regionvit as th_rv
from converter.engine import convert_state_dict
from converter.fixtures import randomize_

from conftest import MANIFESTS

DENSE_NAMES = list(tables.DENSE_CONFIGS)
WITH_MANIFEST = ["regionvit_small_det", "regionvit_small_w14_det", "regionvit_base_w14_peg_det"]
PARITY_NAMES = ["regionvit_small_det", "regionvit_small_w14_peg_det"]
FIXTURE_SIZES = [(256, 352), (384, 512)]


def dense_manifest(name):
    return json.loads((MANIFESTS / "dense" / f"{name}.json").read_text())


def meta_model(name):
    """The torch reference without allocating or initialising weights (keys and shapes only)."""
    with torch.device("meta"):
        return getattr(th_rv, name)()


# ---------------------------------------------------------------------------
# Configs and state dicts
# ---------------------------------------------------------------------------

def test_dense_names_and_factories():
    assert DENSE_NAMES == ["regionvit_small_det", "regionvit_small_w14_det", "regionvit_small_w14_peg_det",
                           "regionvit_base_det", "regionvit_base_w14_det", "regionvit_base_w14_peg_det"]
    for name in DENSE_NAMES:
        cfg = tables.DENSE_CONFIGS[name]
        assert cfg.backbone is tables.CONFIGS[name[:-len("_det")]]
        assert (cfg.det_norm, cfg.drop_path_rate, cfg.freeze_at) == (True, 0.2, 0)  # detection/configs/*.yaml
        assert callable(getattr(th_rv, name)) and callable(getattr(pd_rv, name))
    assert th_rv.DENSE_MODEL is th_rv.RegionViTDet and pd_rv.DENSE_MODEL is pd_rv.RegionViTDet


@pytest.mark.parametrize("name", WITH_MANIFEST)
def test_reference_state_dict_equals_manifest(name):
    manifest = dense_manifest(name)
    model = meta_model(name)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(e["key"], e["shape"]) for e in manifest["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]  # proj_cls counted once
    assert [f["channels"] for f in model.feature_info] == manifest["dense"]["out_channels"]
    assert [f["stride"] for f in model.feature_info] == manifest["dense"]["strides"]
    assert manifest["fixture_input_sizes"] == [list(size) for size in FIXTURE_SIZES]
    assert {(n, size) for n in PARITY_NAMES for size in FIXTURE_SIZES} == set(EXPECTED_LAYOUTS)


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_dense_state_dict_is_the_classifier_without_norm_and_head_plus_norm0_to_3(name):
    """The pattern the three manifests show, applied to the classification manifests: this is
    how the variants without a dense manifest are checked."""
    classifier = json.loads((MANIFESTS / f"{name[:-len('_det')]}.json").read_text())["state_dict"]
    channels = tables.DENSE_CONFIGS[name].out_channels
    expected = [(e["key"], e["shape"]) for e in classifier if not e["key"].startswith(("norm.", "head."))]
    expected += [(f"norm{i}.{leaf}", [1, c, 1, 1]) for i, c in enumerate(channels) for leaf in ("weight", "bias")]
    assert [(k, list(v.shape)) for k, v in meta_model(name).state_dict().items()] == expected


@pytest.mark.parametrize("name", ["regionvit_small_det", "regionvit_base_w14_peg_det"])
def test_paddle_state_dict_maps_onto_the_reference(name):
    t_shapes = {k: tuple(v.shape) for k, v in meta_model(name).state_dict().items()}
    p_model = getattr(pd_rv, name)()
    p_shapes = {k: tuple(v.shape) for k, v in p_model.state_dict().items()}
    assert list(p_shapes) == list(t_shapes)  # same names, same order
    for key, shape in t_shapes.items():
        linear = any(rule.matches(key) for rule in rv_map.RULES)
        assert p_shapes[key] == (shape[::-1] if linear else shape), key
    for i in range(4):  # the dense-only norms: official init weight 1, bias 0
        assert np.all(getattr(p_model, f"norm{i}").weight.numpy() == 1)
        assert np.all(getattr(p_model, f"norm{i}").bias.numpy() == 0)


# ---------------------------------------------------------------------------
# Paddle vs torch, per stage
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs():
    """name -> (torch reference with seeded random weights, Paddle model with the converted ones)."""
    cache = {}

    def build(name):
        if name not in cache:
            t_model = randomize_(getattr(th_rv, name)(), seed=0, input_size=224).eval()
            p_model = getattr(pd_rv, name)()
            state, _ = convert_state_dict({k: v.numpy() for k, v in t_model.state_dict().items()}, rv_map.RULES,
                                          {k: tuple(v.shape) for k, v in p_model.state_dict().items()})
            missing, unexpected = p_model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
            assert not missing and not unexpected
            p_model.eval()
            cache[name] = (t_model, p_model)
        return cache[name]

    return build


def run_both(t_model, p_model, height, width, seed=0):
    x = np.random.default_rng(seed).standard_normal((1, 3, height, width), dtype=np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in t_model(torch.from_numpy(x))]
    with paddle.no_grad():
        got = [t.numpy() for t in p_model(paddle.to_tensor(x))]
    return expected, got


def assert_stages_close(expected, got, height, width):
    assert [e.shape for e in expected] == [g.shape for g in got]
    for i, (e, g) in enumerate(zip(expected, got)):
        assert e.shape[2:] == (-(-height // 2 ** (i + 2)), -(-width // 2 ** (i + 2)))  # stride 4 * 2**i, ceil
        err = float(np.abs(e - g).max())
        assert err <= 1e-5 * max(1.0, float(np.abs(e).max())), f"stage {i}: max abs err {err:.3g}"


@pytest.mark.parametrize("size", [(112, 150), (57, 29), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", PARITY_NAMES)
def test_paddle_matches_torch_on_other_sizes_the_official_code_accepts(pairs, name, size):
    """112 is a multiple of 28 and 56 while 150 is not (the whole-patch stem padding); 57x29 and
    1x1 pad a whole window column/row of local tokens."""
    assert tables.DENSE_CONFIGS[name].input_problem(*size) is None
    expected, got = run_both(*pairs(name), *size, seed=1)
    assert_stages_close(expected, got, *size)


def test_out_indices_select_stages(pairs):
    t_full, _ = pairs("regionvit_small_det")
    with torch.no_grad():
        full = [t.numpy() for t in t_full(torch.zeros(1, 3, 120, 90))]
    for module in (th_rv, pd_rv):
        model = module.regionvit_small_det(out_indices=(2, 1))
        assert model.out_indices == (1, 2)
        assert model.feature_info == [{"channels": 192, "stride": 8}, {"channels": 384, "stride": 16}]
        assert len(model.state_dict()) == len(t_full.state_dict())  # norm3 and layers.3 stay (official keys)
    t_sub = th_rv.regionvit_small_det(out_indices=(1, 3))
    t_sub.load_state_dict(t_full.state_dict())
    with torch.no_grad():
        sub = [t.numpy() for t in t_sub.eval()(torch.zeros(1, 3, 120, 90))]
    assert len(sub) == 2 and np.array_equal(sub[0], full[1]) and np.array_equal(sub[1], full[3])
    with pytest.raises(ValueError):
        th_rv.regionvit_small_det(out_indices=(4,))


def test_det_norm_feeds_the_next_stage(pairs):
    """The normalised map is the output AND the next stage's input (inline, not a side branch)."""
    t_model, _ = pairs("regionvit_small_det")
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 3, 64, 96), dtype=np.float32))
    with torch.no_grad():
        outs = t_model(x)
        regional, local = t_model.cls_token(x, extra_padding=True), t_model.patch_embed(x)
        side_regional, side_local = regional, local
        for i, layer in enumerate(t_model.layers):
            norm = getattr(t_model, f"norm{i}")
            regional, local = layer(regional, local)
            local = norm(local)
            assert torch.equal(local, outs[i])
            side_regional, side_local = layer(side_regional, side_local)
            if i:  # a side-branch norm (next stage fed the unnormalised map) gives other features
                assert (norm(side_local) - outs[i]).abs().max().item() > 1e-3
        # each output is channel-normalised per pixel, then scaled by the (1, C, 1, 1) affine
        normalised = (outs[0] - t_model.norm0.bias) / t_model.norm0.weight
        assert normalised.mean(1).abs().max().item() < 1e-4
        assert (normalised.var(1, unbiased=False) - 1).abs().max().item() < 1e-3


# ---------------------------------------------------------------------------
# Input handling: regional stem padding, local padding and mask (official quirks)
# ---------------------------------------------------------------------------

def official_extra_padding(H, W, p):
    """regionvit.py:66-71 (PatchEmbed.forward, extra_padding=True), transcribed."""
    if H % p != 0 or W % p != 0:
        p_l = (p - W % p) // 2
        p_r = (p - W % p) - p_l
        p_t = (p - H % p) // 2
        p_b = (p - H % p) - p_t
        return (p_l, p_r, p_t, p_b)
    return (0, 0, 0, 0)


def official_flatten_mask(rows, cols, ws, p_b, p_r):
    """regionvit.py:188-208 (convert_to_flatten_layout, need_mask), transcribed in torch for one
    image; 1 = may attend."""
    ksks = ws * ws
    H_s, W_s = rows, cols
    mask = torch.ones(rows * cols, 1 + ksks, 1 + ksks)
    right = torch.zeros(1 + ksks, 1 + ksks)
    tmp = torch.zeros(ws, ws)
    tmp[0:(ws - p_r), 0:(ws - p_r)] = 1.
    tmp = tmp.repeat(ws, ws)
    right[1:, 1:] = tmp
    right[0, 0] = 1
    right[0, 1:] = torch.tensor([1.] * (ws - p_r) + [0.] * p_r).repeat(ws)
    right[1:, 0] = torch.tensor([1.] * (ws - p_r) + [0.] * p_r).repeat(ws)
    bottom = torch.zeros_like(right)
    bottom[0:ws * (ws - p_b) + 1, 0:ws * (ws - p_b) + 1] = 1.
    bottom_right = copy.deepcopy(right)
    bottom_right[0:ws * (ws - p_b) + 1, 0:ws * (ws - p_b) + 1] = 1.
    mask[W_s - 1:(H_s - 1) * W_s:W_s, ...] = right
    mask[(H_s - 1) * W_s:, ...] = bottom
    mask[-1, ...] = bottom_right
    return mask


def test_regional_padding_is_the_official_formula():
    sizes = [(h, w) for h in (1, 27, 28, 56, 100, 224, 256, 384, 672, 700) for w in (28, 57, 300, 352, 512, 1024)]
    for p in (28, 56):
        for h, w in sizes:
            left, right, top, bottom = tables.regional_padding(h, w, p)
            assert (left, right, top, bottom) == official_extra_padding(h, w, p)
            assert (h + top + bottom) % p == 0 and (w + left + right) % p == 0
    # the quirk: 224 is a multiple of 28, 300 is not, so the rows pad by a whole 28-pixel patch
    assert tables.regional_padding(224, 300, 28) == (4, 4, 14, 14)
    assert tables.regional_padding(224, 224, 28) == (0, 0, 0, 0)
    # a typical detectron2 input (672 x 1024): 25 x 37 regions where minimal padding would give 24 x 37
    assert tables.regional_padding(672, 1024, 28) == (6, 6, 14, 14)


@pytest.mark.parametrize("module", [th_rv, pd_rv], ids=["torch", "paddle"])
def test_regional_stem_grid_takes_the_whole_patch_padding(module):
    stem = module.PatchEmbed(28, 8, "linear")
    x = np.zeros((1, 3, 224, 300), dtype=np.float32)
    out = stem(torch.from_numpy(x) if module is th_rv else paddle.to_tensor(x), extra_padding=True)
    assert tuple(out.shape[2:]) == (9, 11)


@pytest.fixture
def layout_spy(monkeypatch):
    """Records (framework, rows, cols, ws, pad_b, pad_r, mask) for every flatten in both model files."""
    calls = []

    def spy(module, framework):
        original = module.to_flat_layout

        def record(regional, local, ws):
            out, mask = original(regional, local, ws)
            rows, cols = regional.shape[2:]
            m = None if mask is None else np.asarray(mask.numpy() if framework == "paddle" else mask)
            calls.append((framework, rows, cols, ws, rows * ws - local.shape[2], cols * ws - local.shape[3], m))
            return out, mask
        monkeypatch.setattr(module, "to_flat_layout", record)

    spy(th_rv, "torch")
    spy(pd_rv, "paddle")
    return calls


# (rows, cols, ws, pad_b, pad_r) per flatten, from the official arithmetic: stem grids
# ceil(H / 4) and (H + regional padding) / (4 ws); each stage halves both, rounding up.
EXPECTED_LAYOUTS = {
    ("regionvit_small_det", (256, 352)): [(10, 13, 7, 6, 3), (5, 7, 7, 3, 5), (3, 4, 7, 5, 6), (2, 2, 7, 6, 3)],
    ("regionvit_small_det", (384, 512)): [(14, 19, 7, 2, 5), (7, 10, 7, 1, 6), (4, 5, 7, 4, 3), (2, 3, 7, 2, 5)],
    # PEG re-flattens after the first block: each stage appears twice
    ("regionvit_small_w14_peg_det", (256, 352)): [(5, 7, 14, 6, 10)] * 2 + [(3, 4, 14, 10, 12)] * 2
    + [(2, 2, 14, 12, 6)] * 2 + [(1, 1, 14, 6, 3)] * 2,
    ("regionvit_small_w14_peg_det", (384, 512)): [(7, 10, 14, 2, 12)] * 2 + [(4, 5, 14, 8, 6)] * 2
    + [(2, 3, 14, 4, 10)] * 2 + [(1, 2, 14, 2, 12)] * 2,
}


@pytest.mark.parametrize("case", list(EXPECTED_LAYOUTS), ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
def test_paddle_matches_torch_per_stage(pairs, layout_spy, case):
    """At the manifests' fixture sizes: Paddle vs torch per stage; every stage pads the local
    tokens bottom/right and masks, in both frameworks, with the official mask (quirk included)."""
    name, (height, width) = case
    t_model, p_model = pairs(name)
    expected, got = run_both(t_model, p_model, height, width)
    assert len(got) == 4
    assert [g.shape[1] for g in got] == list(tables.DENSE_CONFIGS[name].out_channels)
    assert_stages_close(expected, got, height, width)
    for framework in ("torch", "paddle"):
        calls = [c[1:] for c in layout_spy if c[0] == framework]
        assert [c[:5] for c in calls] == EXPECTED_LAYOUTS[case]
        for rows, cols, ws, pad_b, pad_r, mask in calls:
            official = official_flatten_mask(rows, cols, ws, pad_b, pad_r).numpy().astype(bool)
            assert mask is not None and mask.shape == (rows * cols, 1, 1 + ws * ws, 1 + ws * ws)
            assert np.array_equal(~mask[:, 0], official)


def test_bottom_right_window_attends_padded_tokens_or_quirk():
    """In the bottom-right window the official code ORs the right and bottom masks: a valid query
    attends right-padded keys of valid rows and bottom-padded keys of valid columns; only the
    corner (padded in both) is blocked.  Other last-column / last-row windows block all of them."""
    rows, cols, ws, pad_b, pad_r = 10, 13, 7, 6, 3  # regionvit_small_det at 256x352, stage 1
    blocked = tables.window_mask(rows, cols, ws, pad_b, pad_r)
    tok = np.arange(ws * ws)
    row_pad, col_pad = tok // ws >= ws - pad_b, tok % ws >= ws - pad_r
    valid = ~row_pad & ~col_pad
    corner = blocked[-1]
    for q in 1 + np.flatnonzero(valid):
        assert np.array_equal(corner[q, 1:], row_pad & col_pad)  # OR: only the corner keys blocked
    assert corner[1:, 1:][valid][:, row_pad & ~col_pad].sum() == 0  # bottom padding attended
    assert corner[1:, 1:][valid][:, col_pad & ~row_pad].sum() == 0  # right padding attended
    right_window = blocked[cols - 1]  # last column, first row: every right-padded key blocked
    for q in 1 + np.flatnonzero(valid):
        assert np.array_equal(right_window[q, 1:], col_pad)
    bottom_window = blocked[(rows - 1) * cols]  # last row, first column
    for q in 1 + np.flatnonzero(valid):
        assert np.array_equal(bottom_window[q, 1:], row_pad)


def and_mask(rows, cols, ws, pad_b, pad_r):
    """What was meant: the bottom-right window blocks every padded token (AND of the two masks)."""
    blocked = tables.window_mask(rows, cols, ws, pad_b, pad_r).copy()
    local = np.arange(ws * ws)
    ok = np.concatenate([[True], (local % ws < ws - pad_r) & (local // ws < ws - pad_b)])
    blocked[-1] = ~(ok[:, None] & ok[None, :])
    return blocked


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_the_or_mask_quirk_changes_the_features(pairs, monkeypatch, name):
    """Reproducing the quirk matters: the intended AND mask gives different features."""
    t_model, _ = pairs(name)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 3, 120, 150), dtype=np.float32))
    with torch.no_grad():
        official = t_model(x)
        monkeypatch.setattr(th_rv, "window_mask", and_mask)
        intended = t_model(x)
    assert (official[0] - intended[0]).abs().max().item() > 1e-3


def test_the_whole_patch_stem_padding_changes_the_features(pairs, monkeypatch):
    """112 x 150: official regional grid 5 x 6 (rows padded by a whole patch); minimal padding
    (4 x 6) gives different features."""
    t_model, _ = pairs("regionvit_small_det")
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 3, 112, 150), dtype=np.float32))
    with torch.no_grad():
        official = t_model(x)
        monkeypatch.setattr(th_rv, "regional_padding", lambda h, w, p: (-w % p // 2, -w % p - -w % p // 2,
                                                                        -h % p // 2, -h % p - -h % p // 2))
        minimal = t_model(x)
    assert [o.shape for o in official] == [m.shape for m in minimal]
    assert (official[0] - minimal[0]).abs().max().item() > 1e-3


def test_outputs_are_cropped_and_blocked_rows_stay_finite(pairs):
    """Padded local tokens are cropped from every output (ceil(H / stride) x ceil(W / stride)); a
    query whose keys are all blocked (a corner-padded query of the quirky window) gets uniform
    weights from finfo.min scores, never NaN."""
    t_model, _ = pairs("regionvit_small_det")
    with torch.no_grad():
        outs = t_model(torch.zeros(1, 3, 122, 171))
        assert [tuple(o.shape[2:]) for o in outs] == [(31, 43), (16, 22), (8, 11), (4, 6)]
        attn = t_model.layers[0].block[1].attn
        mask = torch.ones(2, 1, 50, 50, dtype=torch.bool)
        assert torch.isfinite(attn(torch.randn(2, 50, 96), patch_attn=True, mask=mask)).all()


def test_input_problem():
    """The official code has no size assert and runs on any size (checked against it for every
    height and width 1..65); only the 1conv stem (base variants) needs 2 pixels."""
    for name, cfg in tables.DENSE_CONFIGS.items():
        smallest = 1 if cfg.backbone.patch_conv_type == "3conv" else 2
        for size in [(256, 352), (384, 512), (672, 1024), (smallest, 57), (57, smallest)]:
            assert cfg.input_problem(*size) is None, (name, size)
    assert "1x40" in tables.DENSE_CONFIGS["regionvit_base_det"].input_problem(1, 40)
    assert "40x1" in tables.DENSE_CONFIGS["regionvit_base_w14_peg_det"].input_problem(40, 1)
