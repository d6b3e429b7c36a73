"""timm -> PaddleClas, on code we wrote on neither side: for each committed pair file in
pairs/timm_paddleclas/, `map` re-derives exactly its rules (honouring its [hand] section), a
timm-format checkpoint (a bare state dict) with seeded random weights converts, PaddleClas's own
model loads the result with set_state_dict (nothing missing, nothing unexpected), and verify's max
abs logit error (batch 2, CPU float32) is within 1e-4 -- or, for a pair whose PaddleClas model is
numerically another network, diff names the first divergent layer recorded here with its cause; or,
for a seeded network so ill-conditioned that float32 alone exceeds 1e-4, within 3x timm's own
float32-vs-float64 error."""
import tomllib

import pytest

from conftest import ROOT

PAIR_DIR = ROOT / "pairs" / "timm_paddleclas"
MAX_ERR = 1e-4


def _importable() -> str:
    """Why the pairs cannot run here ('' when they can)."""
    try:
        import timm  # noqa: F401  (imports torchvision, which needs a matching torch build)
    except Exception as exc:  # ImportError, or torchvision's operator registration failing
        return f"timm does not import ({type(exc).__name__}: {exc})"
    try:
        from converter.specs import _paddleclas_backbones

        _paddleclas_backbones()
    except Exception as exc:
        return f"paddleclas does not import ({type(exc).__name__}: {exc})"
    return ""


WHY_NOT = _importable()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=f"{WHY_NOT}; install the pairs extra (README, Tests)")

# Pairs whose PaddleClas model computes another function than timm's, with the layer diff names
# first and the cause.  Every other pair must be within MAX_ERR.
DIVERGENT = {
    "swin_tiny_patch4_window7_224": (
        "layers.3.blocks.1.attn.qkv",
        "PaddleClas's SwinTransformerBlock keeps shift_size 3 in stage 4, where the 7x7 map is one 7x7 window; "
        "timm, like the official Swin, sets the shift to 0 when the resolution is not above the window size: "
        "PaddleClas rolls and masks the tokens before attention, timm does not"),
    "res2net50_26w_4s": (
        "layer1.0.convs.1",
        "the first block of stage 1 has stride 1 but a downsample: timm (like the official Res2Net) treats it as "
        "a stage's first block and feeds each split to its 3x3 conv alone; PaddleClas treats only stride-2 blocks "
        "so, and adds the previous split's output first"),
}
# Pairs that compute the same function but whose seeded network is so ill-conditioned that float32
# rounding alone exceeds MAX_ERR: held to 3x the timm model's own float32-vs-float64 logit error.
NOISE_FLOOR = {
    "levit_128s": "attention logits grow through the stages (random Linear+BN weights): timm's own float32 "
                  "forward differs from its float64 forward by ~1.4e-3; no single layer jumps",
}

PAIRS = sorted(p.stem for p in PAIR_DIR.glob("*.toml"))


def test_at_least_ten_pairs_across_cnns_and_transformers():
    assert len(PAIRS) >= 10, PAIRS
    transformers = [p for p in PAIRS if any(t in p for t in ("vit", "deit", "swin", "pvt", "levit"))]
    assert len(transformers) >= 4 and len(PAIRS) - len(transformers) >= 4


@pytest.mark.parametrize("name", PAIRS)
def test_timm_to_paddleclas(name, tmp_path, restore_registry):
    import paddle

    from converter import api
    from converter.fixtures import make_official_checkpoint
    from converter.pairs import map_pair
    from converter.verify import run_verify

    committed = PAIR_DIR / f"{name}.toml"
    data = tomllib.loads(committed.read_text())
    pair = tmp_path / committed.name
    pair.write_text(committed.read_text())  # map keeps and honours its [hand] section
    torch_spec, paddle_spec = (_spec(data[side]) for side in ("torch", "paddle"))
    result = map_pair(torch_spec, paddle_spec, pair, input_size=data["pair"]["input_size"], name=name)
    assert tomllib.loads(pair.read_text()) == data, "the committed pair file is not what map writes"
    assert result.hand_edits == sum(len(v) for v in data["hand"].values())

    ckpt = make_official_checkpoint(str(pair), tmp_path / f"{name}.pth", container="raw")  # timm's format
    pdparams = tmp_path / f"{name}.pdparams"
    api.convert(str(pair), ckpt, pdparams)
    spec = api.get_spec(str(pair))
    model = spec.create_paddle()  # PaddleClas's own model, loaded with its own set_state_dict
    missing, unexpected = model.set_state_dict(paddle.load(str(pdparams)))
    assert (missing, unexpected) == ([], [])

    report = run_verify(name, ckpt, pdparams, batch_size=2)
    if name in NOISE_FLOOR:
        floor = _float32_noise(spec, ckpt)
        assert report.max_abs_err > MAX_ERR and report.max_abs_err <= 3 * floor, (report.max_abs_err, floor)
    elif name in DIVERGENT:
        from converter.diff import run_diff

        layer, cause = DIVERGENT[name]
        assert not report.passed
        assert run_diff(name, ckpt, pdparams).first_divergent.torch == layer, cause
    else:
        assert report.max_abs_err <= MAX_ERR, report.format()
        assert report.top1_agreement == 1.0


def _float32_noise(spec, ckpt) -> float:
    """Max abs difference between the torch model's float32 and float64 logits on verify's batch."""
    import torch

    from converter.api import create_torch_model
    from converter.verify import random_batch

    model = create_torch_model(str(spec.path), ckpt)
    batch = torch.from_numpy(random_batch(2, spec.input_size, 0))
    with torch.no_grad():
        single = model(batch).double()
        double = model.double()(batch.double())
    return float((single - double).abs().max())


def _spec(side: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in side.get("kwargs", {}).items())
    return side["spec"] + (f"({args})" if args else "")


@pytest.mark.parametrize("torch_spec, paddle_spec, fragments", [
    ("timm:convnxt_tiny", "paddleclas:ConvNeXt_tiny",
     ["timm has no model 'convnxt_tiny'", "did you mean", "convnext_tiny"]),
    ("timm:convnext_tiny", "paddleclas:ConvNext_tiny", ["PaddleClas has no backbone 'ConvNext_tiny'", "ConvNeXt_tiny"]),
    ("timm:convnext_tiny", "timm:convnext_tiny",
     ["timm:convnext_tiny: builds a torch model, but a paddle model is needed"]),
])
def test_unknown_names_are_one_line(capsys, tmp_path, torch_spec, paddle_spec, fragments):
    from conftest import assert_one_line_error, cli

    code, out, err = cli(capsys, "map", torch_spec, paddle_spec, "-o", tmp_path / "x.toml")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "x.toml").exists()
