"""CrossFormer dense backbones (detection / segmentation): the reference against the official
manifests, Paddle against the reference per stage, and the two official dense codes.

The released dense weights were trained with the v1 backbone (cheerss/CrossFormer @ 4fbf750,
``models/crossformer_backbone.py``); CrossFormer++ detection uses HEAD's (@ 7952010,
``models/crossformer_backbone_det.py``).  They group the long-distance attention (LDA)
differently: v1 forms I x I groups of (Hp/I) x (Wp/I) tokens after padding to a multiple of I,
HEAD fixed G x G groups inside regions of G*I.  The functions ``_official_block`` /
``_official_attention`` below transcribe the official block forwards line by line (their
in-place changes of ``lsda_flag`` / ``group_size`` included) as an oracle that shares no code
with the models.
"""
import copy
import dataclasses
import functools
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as F

import mappings.crossformer as crossformer_mapping
from converter.engine import convert_state_dict
from converter.fixtures import randomize_
from model_configs.crossformer import DENSE_CONFIGS, NEG_INF, block_layout
from paddle_models import crossformer as paddle_crossformer
from reference_torch import crossformer as torch_crossformer

from conftest import MAX_ABS_ERR, load_manifest

DENSE_NAMES = ["crossformer_small_det", "crossformer_base_det", "crossformer_large_seg", "crossformer_pp_small_det"]
FIXTURE_SIZES = [(256, 352), (384, 512)]  # every dense manifest's fixture_input_sizes
@functools.cache
def _models(name):
    """(torch reference with seeded random weights, Paddle port with the converted weights), eval."""
    torch_model = randomize_(getattr(torch_crossformer, name)(), seed=0, input_size=224).eval()
    paddle_model = getattr(paddle_crossformer, name)()
    paddle_model.eval()
    state, _ = convert_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                  crossformer_mapping.RULES,
                                  {k: tuple(v.shape) for k, v in paddle_model.state_dict().items()})
    paddle_model.set_state_dict(state)
    return torch_model, paddle_model


@pytest.fixture(scope="module", autouse=True)
def _free_the_models():
    """Up to ~1.5 GB of weights (both frameworks): not kept beyond this module."""
    yield
    _models.cache_clear()


def _image(height, width, seed=0):
    return np.random.RandomState(seed).randn(1, 3, height, width).astype(np.float32)


def _torch_features(model, image):
    with torch.no_grad():
        return [f.numpy() for f in model(torch.from_numpy(image))]


# ----------------------------------------------------------------------------- state dict, outputs

@pytest.mark.parametrize("name", DENSE_NAMES)
def test_reference_state_dict_is_theload_manifest(name):
    manifest = load_manifest(name)
    state = getattr(torch_crossformer, name)().state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == [(e["key"], e["shape"]) for e in manifest["state_dict"]]
    assert sum(v.numel() for v in state.values()) == manifest["num_parameters"]
    assert not any(k.startswith(("norm.", "head.")) for k in state)  # classification-only keys
    # every dense manifest is built on this code and config
    source = manifest["official_source"]
    cfg = DENSE_CONFIGS[name]
    assert list(cfg.group_size) == source["backbone_kwargs"]["group_size"]
    assert list(cfg.interval) == source["backbone_kwargs"]["crs_interval"]
    assert cfg.code == ("v1" if source["code_version"].startswith("v1") else "head")
    assert [tuple(s) for s in manifest["fixture_input_sizes"]] == FIXTURE_SIZES


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_paddle_state_dict_maps_to_theload_manifest(name):
    paddle_model = getattr(paddle_crossformer, name)()
    manifest = load_manifest(name)
    keys = [e["key"] for e in manifest["state_dict"]]
    assert list(paddle_model.state_dict()) == keys  # same names, same order; Linear weights transposed
    for entry in manifest["state_dict"]:
        shape = list(paddle_model.state_dict()[entry["key"]].shape)
        assert shape == (entry["shape"][::-1] if entry["kind"] == "linear_weight" else entry["shape"])


@pytest.mark.parametrize("classifier, name", [("crossformer_small", "crossformer_small_det"),
                                              ("crossformer_pp_small", "crossformer_pp_small_det")])
def test_classifier_checkpoint_starts_a_dense_backbone(classifier, name):
    """FROM_CLASSIFIER: an ImageNet checkpoint (v1-style, with every block's DPB tables) fills the
    dense backbone: ``norm`` / ``head`` dropped, the tables checked and dropped, nothing else."""
    model = getattr(torch_crossformer, classifier)()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state.update({k: v.numpy() for k, v in model.named_buffers()
                  if k.endswith(("attn.biases", "attn.relative_position_index"))})
    paddle_model = getattr(paddle_crossformer, name)()
    converted, report = convert_state_dict(state, crossformer_mapping.RULES + crossformer_mapping.FROM_CLASSIFIER,
                                           {k: tuple(v.shape) for k, v in paddle_model.state_dict().items()})
    assert list(converted) == list(paddle_model.state_dict())
    blocks = sum(DENSE_CONFIGS[name].depths)
    assert report.num_dropped == 4 + 2 * blocks  # norm.weight/bias, head.weight/bias, 2 tables per block


@pytest.mark.parametrize("size", FIXTURE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", DENSE_NAMES)
def test_paddle_matches_reference_per_stage(name, size):
    torch_model, paddle_model = _models(name)
    manifest = load_manifest(name)
    image = _image(*size)
    expected = _torch_features(torch_model, image)
    with paddle.no_grad():
        got = [f.numpy() for f in paddle_model(paddle.to_tensor(image))]
    assert len(got) == len(expected) == 4
    for stage, (t, p, info) in enumerate(zip(expected, got, paddle_model.feature_info)):
        stride = manifest["dense"]["strides"][stage]
        assert t.shape == p.shape == (1, manifest["dense"]["out_channels"][stage], size[0] // stride, size[1] // stride)
        assert info == {"channels": t.shape[1], "stride": stride} == torch_model.feature_info[stage]
        err, scale = float(np.abs(t - p).max()), float(np.abs(t).max())
        assert err <= MAX_ABS_ERR * max(1.0, scale), f"stage {stage}: max abs err {err:.2e} (max |feature| {scale:.2f})"


def test_out_indices_select_and_order_the_maps():
    torch_model = torch_crossformer.crossformer_small_det(out_indices=(3, 1))
    paddle_model = paddle_crossformer.crossformer_small_det(out_indices=(3, 1))
    for model in (torch_model, paddle_model):
        assert model.out_indices == (3, 1)
        assert model.feature_info == [{"channels": 768, "stride": 32}, {"channels": 192, "stride": 8}]
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in torch_model.eval()(torch.zeros(1, 3, 64, 96))]
    assert shapes == [(1, 768, 2, 3), (1, 192, 8, 12)]
    with pytest.raises(ValueError, match="out_indices"):
        torch_crossformer.crossformer_small_det(out_indices=(0, 4))


@pytest.mark.parametrize("h, w", [(250, 352), (256, 340), (16, 64), (0, 32)])
def test_sizes_the_official_code_cannot_take_are_refused(h, w):
    cfg = DENSE_CONFIGS["crossformer_small_det"]
    assert "multiples of 32" in cfg.input_problem(h, w)
    for model in (torch_crossformer.crossformer_small_det(), paddle_crossformer.crossformer_small_det()):
        with pytest.raises(ValueError, match=f"input {h}x{w}: H and W must be positive multiples of 32"):
            model(torch.zeros(1, 3, h, w) if isinstance(model, torch.nn.Module) else paddle.zeros([1, 3, h, w]))


def test_any_multiple_of_32_is_accepted():
    cfg = DENSE_CONFIGS["crossformer_pp_small_det"]
    assert all(cfg.input_problem(h, w) is None for h, w in [(32, 32), (256, 352), (800, 1344), (32, 1024)])


def test_reference_runs_in_float64():
    """The official code casts the DPB input with ``.float()``, so ``model.double()`` fails there;
    the reference casts it to the parameters' dtype (a no-op in float32).  The float32 run stays
    within float32 noise of the float64 one."""
    torch_model, _ = _models("crossformer_small_det")
    image = _image(64, 96)
    f32 = _torch_features(torch_model, image)
    with torch.no_grad():
        f64 = [f.numpy() for f in copy.deepcopy(torch_model).double()(torch.from_numpy(image).double())]
    for a, b in zip(f32, f64):
        assert b.dtype == np.float64
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())


# ----------------------------------------------------------------------------- the official codes

def _official_attention(attn, x, group_h, group_w, mask):
    """v1 ``Attention.forward`` (models/crossformer_backbone.py:101-155 @ 4fbf750; HEAD's
    models/crossformer_backbone_det.py:110-164 computes the same), on ``attn``'s weights."""
    B_, N, C = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(B_, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).contiguous()
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    bias_h, bias_w = torch.arange(1 - group_h, group_h), torch.arange(1 - group_w, group_w)
    biases = torch.stack(torch.meshgrid([bias_h, bias_w], indexing="ij")).flatten(1).transpose(0, 1)
    biases = biases.contiguous().to(x.dtype)  # official: .float()
    coords = torch.stack(torch.meshgrid([torch.arange(group_h), torch.arange(group_w)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += group_h - 1
    rel[:, :, 1] += group_w - 1
    rel[:, :, 0] *= 2 * group_w - 1
    pos = attn.pos(biases)
    scores = scores + pos[rel.sum(-1).view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    if mask is not None:
        nG = mask.shape[0]
        scores = (scores.view(B_ // nG, nG, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, N, N)
    return attn.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B_, N, C))


def _official_block(blk, x, H, W, code, state):
    """``CrossFormerBlock.forward`` of the v1 code (models/crossformer_backbone.py:223-297 @ 4fbf750)
    or of HEAD's dense code (models/crossformer_backbone_det.py:254-346 @ 7952010) on ``blk``'s
    weights.  ``state`` holds the official block's ``group_size`` / ``lsda_flag`` and is changed in
    place exactly where the official forward assigns them."""
    B, L, C = x.shape
    I = blk.interval
    if min(H, W) <= state.group_size:
        state.lsda_flag = 0
        if code == "v1":
            state.group_size = min(H, W)
            G = state.group_size
        else:
            G = max(H, W)
    else:
        G = state.group_size
    shortcut = x
    x = blk.norm1(x).view(B, H, W, C)
    size_div = (I if code == "v1" else I * G) if state.lsda_flag == 1 else G
    pad_r, pad_b = (size_div - W % size_div) % size_div, (size_div - H % size_div) % size_div
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = x.shape[1:3]
    mask = torch.zeros((1, Hp, Wp, 1))
    if pad_b > 0:
        mask[:, -pad_b:, :, :] = -1
    if pad_r > 0:
        mask[:, :, -pad_r:, :] = -1
    if state.lsda_flag == 0:  # SDA
        Gh = Gw = G
        order, shape = (0, 1, 3, 2, 4, 5), (B, Hp // G, G, Wp // G, G)
        back, back_order = (B, Hp // G, Wp // G, G, G, C), (0, 1, 3, 2, 4, 5)
    elif code == "v1":  # LDA: I x I groups of (Hp/I) x (Wp/I)
        Gh, Gw = Hp // I, Wp // I
        order, shape = (0, 2, 4, 1, 3, 5), (B, Gh, I, Gw, I)
        back, back_order = (B, I, I, Gh, Gw, C), (0, 3, 1, 4, 2, 5)
    else:  # HEAD LDA: regions of G*I, I x I groups of G x G in each
        Gh = Gw = G
        Rh, Rw = Hp // (G * I), Wp // (G * I)
        order, shape = (0, 1, 4, 3, 6, 2, 5, 7), (B, Rh, G, I, Rw, G, I)
        back, back_order = (B, Rh, Rw, I, I, G, G, C), (0, 1, 5, 3, 2, 6, 4, 7)
    x = x.reshape(*shape, C).permute(*order).contiguous().reshape(-1, Gh * Gw, C)
    attn_mask = None
    if pad_r > 0 or pad_b > 0:
        keys = mask.reshape(1, *shape[1:], 1).permute(*order).contiguous().reshape(-1, 1, Gh * Gw)
        attn_mask = torch.zeros((keys.shape[0], Gh * Gw, Gh * Gw)).masked_fill(keys < 0, NEG_INF)
    x = _official_attention(blk.attn, x, Gh, Gw, attn_mask)
    x = x.reshape(*back).permute(*back_order).contiguous().reshape(B, Hp, Wp, C)
    x = x[:, :H, :W, :].contiguous().view(B, H * W, C)
    x = shortcut + x
    x = x + blk.mlp(blk.norm2(x))
    if blk.use_extra_conv:  # HEAD only (ACL)
        x = blk.ex_conv(x.view(B, H, W, C).permute(0, 3, 1, 2).contiguous())
        x = blk.ex_ln(x.permute(0, 2, 3, 1).contiguous().view(B, H * W, C))
    return x


def _fresh_state(blk):
    return SimpleNamespace(group_size=blk.group_size, lsda_flag=blk.lsda_flag)


def _block_inputs(model, image):
    """[(block name, block, tokens in, (H, W))] for every block of one forward."""
    calls = []
    handles = [blk.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, m, args[0], args[1])))
               for name, blk in model.named_modules() if isinstance(blk, torch_crossformer.CrossFormerBlock)]
    try:
        _torch_features(model, image)
    finally:
        for h in handles:
            h.remove()
    return calls


def _close(a, b):
    return float((a - b).abs().max()) <= MAX_ABS_ERR * max(1.0, float(b.abs().max()))


# Which stages' blocks the v1 and HEAD codes compute alike at 256x352 (see test_where_v1_and_head_compute_alike).
ALIKE_AT_256x352 = {"crossformer_small_det": [False] * 4, "crossformer_large_seg": [True, True, False, False],
                    "crossformer_pp_small_det": [False] * 4}


@pytest.mark.parametrize("name", list(ALIKE_AT_256x352))
def test_every_block_follows_its_official_code(name):
    """Every block of one 256x352 forward against both official block forwards, on the block's own
    input: v1 and HEAD disagree on the LDA blocks of some stages (all four with G 7 / I 8,4,2,1;
    stages 3-4 with G 14,14,7,7 / I 16,8,2,1), and there the _det / _seg models follow v1, the
    CrossFormer++ model HEAD.  Elsewhere the two codes agree (up to float32 rounding)."""
    torch_model, _ = _models(name)
    code = DENSE_CONFIGS[name].code
    differing = []
    with torch.no_grad():
        for block_name, blk, x, (H, W) in _block_inputs(torch_model, _image(256, 352)):
            ours = blk(x, (H, W))
            official = {c: _official_block(blk, x, H, W, c, _fresh_state(blk)) for c in ("v1", "head")}
            assert _close(ours, official[code]), block_name
            if not _close(official["v1"], official["head"]):
                assert float((official["v1"] - official["head"]).abs().max()) > 0.05, block_name
                differing.append(block_name)
    assert differing == [n for n, m in torch_model.named_modules() if isinstance(m, torch_crossformer.CrossFormerBlock)
                         and m.lsda_flag == 1 and not ALIKE_AT_256x352[name][int(n.split(".")[1])]]


def test_v1_and_head_features_agree_at_224_only():
    """Same weights (CrossFormer-S detection), both codes: identical features at 224x224 (every LDA
    map fits one HEAD region: 56 <= 7*8, 28 <= 7*4, 14 <= 7*2; stage 4 is 7x7, global SDA in both);
    far apart on every stage at the fixture sizes."""
    v1_model, _ = _models("crossformer_small_det")
    head_model = torch_crossformer.DENSE_MODEL(dataclasses.replace(DENSE_CONFIGS["crossformer_small_det"], code="head"))
    head_model.load_state_dict(v1_model.state_dict())
    head_model.eval()
    for a, b in zip(_torch_features(v1_model, _image(224, 224)), _torch_features(head_model, _image(224, 224))):
        np.testing.assert_array_equal(a, b)
    for size in FIXTURE_SIZES:
        for stage, (a, b) in enumerate(zip(_torch_features(v1_model, _image(*size)),
                                           _torch_features(head_model, _image(*size)))):
            # 1% of the map's scale: 10^4 x float32 noise (with the official init, std 0.02, the two
            # groupings differ by 3-10% of the scale; the same code path would agree to 1e-6)
            assert np.abs(a - b).max() > 0.01 * np.abs(a).max(), (size, stage)


def _stage_maps(cfg, height, width):
    return [(height // 4 // 2 ** i, width // 4 // 2 ** i) for i in range(len(cfg.depths))]


def _attention_groups(resolution, layout):
    """What a block's attention computes, independent of group order and padding: for every real
    token (row-major), (token, first real token of its group, its slot row / column relative to
    the group's first real slots).  The DPB bias depends on slot differences only, and padded keys
    get weight exactly 0, so two layouts with equal tables compute the same outputs."""
    (H, W), (Gh, Gw), I = resolution, layout.group_shape, layout.group_interval
    Hp, Wp = H + layout.pad_h, W + layout.pad_w
    rows, cols = np.meshgrid(np.arange(Hp), np.arange(Wp), indexing="ij")
    slot_h, slot_w = np.meshgrid(np.arange(Gh), np.arange(Gw), indexing="ij")

    def grouped(a):  # as the models' group_tokens: (nG, Gh*Gw)
        return a.reshape(Hp // (Gh * I), Gh, I, Wp // (Gw * I), Gw, I).transpose(0, 3, 2, 5, 1, 4).reshape(-1, Gh * Gw)

    r, c = grouped(rows), grouped(cols)
    real = (r < H) & (c < W)
    big = Hp * Wp * 4
    token = np.where(real, r * W + c, big)
    sh, sw = np.broadcast_to(slot_h.reshape(1, -1), r.shape), np.broadcast_to(slot_w.reshape(1, -1), r.shape)
    first = token.min(axis=1, keepdims=True)
    rel_h = sh - np.where(real, sh, big).min(axis=1, keepdims=True)
    rel_w = sw - np.where(real, sw, big).min(axis=1, keepdims=True)
    table = np.stack([token, np.broadcast_to(first, r.shape), rel_h, rel_w])[:, real]
    return table[:, np.argsort(table[0])]


def _stages_alike(cfg, height, width):
    """Per stage: do the v1 and HEAD codes compute every block of the stage alike?"""
    alike = []
    for i, hw in enumerate(_stage_maps(cfg, height, width)):
        layouts = [[block_layout(hw, cfg.group_size[i], cfg.interval[i], flag, code) for code in ("v1", "head")]
                   for flag in (0, 1)]
        alike.append(all(np.array_equal(_attention_groups(hw, v1), _attention_groups(hw, head))
                         for v1, head in layouts))
    return alike


@pytest.mark.parametrize("name, size, alike", [
    ("crossformer_small_det", (224, 224), [True, True, True, True]),  # identical layouts, even
    ("crossformer_small_det", (192, 224), [True, True, True, False]),  # stage 4 6x7: v1 G=6 (2 groups), HEAD G=7
    ("crossformer_small_det", (256, 352), [False, False, False, False]),
    ("crossformer_small_det", (384, 512), [False, False, False, False]),
    ("crossformer_small_det", (256, 256), [False, False, False, False]),  # stage 4 8x8: v1 global, HEAD 7x7 windows
    ("crossformer_small_det", (224, 352), [False, False, False, False]),  # stage 4 7x11: v1 G=7 (2 groups), HEAD G=11
    ("crossformer_small_det", (32, 32), [True, True, True, True]),  # 8x8 LDA: v1 64 groups of 1, HEAD of 1 + 48 pads
    ("crossformer_large_seg", (256, 352), [True, True, False, False]),  # 64x88 <= 14*16, 32x44 <= 14*8
    ("crossformer_large_seg", (384, 512), [True, True, False, False]),
    ("crossformer_large_seg", (896, 896), [True, True, False, False]),
    ("crossformer_large_seg", (928, 896), [False, False, False, False]),  # 232 > 224
])
def test_where_v1_and_head_compute_alike(name, size, alike):
    assert _stages_alike(DENSE_CONFIGS[name], *size) == alike


def test_v1_and_head_compute_alike_exactly_where_the_rule_says():
    """Over all H, W in 32..512 (multiples of 32), per stage: the codes compute alike iff a map
    forced to global SDA (min side <= G) is square, and an LDA map fits one HEAD region of G*I."""
    for name in ("crossformer_small_det", "crossformer_large_seg"):
        cfg = DENSE_CONFIGS[name]
        for height in range(32, 513, 32):
            for width in range(32, 513, 32):
                rule = []
                for i, (h, w) in enumerate(_stage_maps(cfg, height, width)):
                    G, I = cfg.group_size[i], cfg.interval[i]
                    rule.append(h == w if min(h, w) <= G else max(h, w) <= G * I)
                assert _stages_alike(cfg, height, width) == rule, (name, height, width)


def test_one_input_does_not_change_the_next():
    """The official blocks write a forced global SDA into themselves: after a 224x224 input (stage 4
    is 7x7 <= G), the stage-4 LDA block stays SDA, so a later 256x352 input (8x11: LDA, one global
    8x11 group in v1) gets 7x7 windows instead.  The models keep no such state: every input gets
    the layout a freshly built official model gives it."""
    torch_model, paddle_model = _models("crossformer_small_det")
    blk = torch_model.layers[3].blocks[1]
    gen = torch.Generator().manual_seed(0)
    small, large = torch.randn(1, 7 * 7, 768, generator=gen), torch.randn(1, 8 * 11, 768, generator=gen)
    with torch.no_grad():
        fresh = blk(large, (8, 11))
        official_state = _fresh_state(blk)
        _official_block(blk, small, 7, 7, "v1", official_state)  # the official block now has lsda_flag 0
        assert (official_state.lsda_flag, official_state.group_size) == (0, 7)
        official_after_small = _official_block(blk, large, 8, 11, "v1", official_state)
        assert _close(fresh, _official_block(blk, large, 8, 11, "v1", _fresh_state(blk)))
        assert not _close(fresh, official_after_small)  # the trap, not reproduced:
        blk(small, (7, 7))
        assert torch.equal(blk(large, (8, 11)), fresh)
        assert (blk.lsda_flag, blk.group_size) == (1, 7)
    # and the whole models, both frameworks: 32x32 forces stages 2-4 to global SDA, 64x96 does not
    image = _image(64, 96)
    before = _torch_features(torch_model, image)
    _torch_features(torch_model, _image(32, 32))
    for a, b in zip(before, _torch_features(torch_model, image)):
        np.testing.assert_array_equal(a, b)
    with paddle.no_grad():
        p_before = [f.numpy() for f in paddle_model(paddle.to_tensor(image))]
        paddle_model(paddle.to_tensor(_image(32, 32)))
        p_after = [f.numpy() for f in paddle_model(paddle.to_tensor(image))]
    for a, b in zip(p_before, p_after):
        np.testing.assert_array_equal(a, b)
