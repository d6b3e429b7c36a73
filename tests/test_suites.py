"""The Paddle suites around our dense backbones, built from configs as a user writes them: a
PaddleDetection RetinaNet (FPN) through ppdet's workspace and a PaddleSeg UPerNet through
PaddleSeg's Config / SegBuilder, each loading a file our converter wrote through the suite's own
loader, then an eval forward and one training step on a dummy batch.

Needs paddledet 2.6.0 / paddleseg 2.8.0 (installed with --no-deps next to torch2paddle[suites]);
the tests of a suite that is not installed are skipped.  One small dense variant per family."""
from __future__ import annotations

import importlib.util
import math
import textwrap

import numpy as np
import pytest

from conftest import run_python

# (registered class, dense name)
BACKBONES = [
    ("FCViT", "fcvit_b12_feat"),
    ("BiFormer", "biformer_small_det"),
    ("CrossFormer", "crossformer_small_det"),
    ("RegionViT", "regionvit_small_det"),
]
HEIGHT, WIDTH = 160, 224  # one non-square image, a multiple of 32 as the suites' batch padding makes it
NUM_CLASSES = 3

requires_ppdet = pytest.mark.skipif(importlib.util.find_spec("ppdet") is None, reason=(
    "PaddleDetection is not installed (pip install 'torch2paddle[suites]' && "
    "pip install --no-deps paddledet==2.6.0)"))
requires_paddleseg = pytest.mark.skipif(importlib.util.find_spec("paddleseg") is None, reason=(
    "PaddleSeg is not installed (pip install 'torch2paddle[suites]' && pip install --no-deps paddleseg==2.8.0)"))


@pytest.fixture(scope="module")
def converted(official_checkpoint, tmp_path_factory):
    """converted(name) -> the .pdparams our converter writes from a seeded official checkpoint."""
    from converter import convert

    out = tmp_path_factory.mktemp("suites")
    cache = {}

    def build(name):
        if name not in cache:
            cache[name] = convert(name, official_checkpoint(name), out / f"{name}.pdparams").output
        return cache[name]

    return build


def assert_backbone_holds(backbone, path):
    """Every weight of the backbone equals the converted file's, key for key."""
    import paddle

    expected = paddle.load(str(path))
    got = backbone.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key].numpy(), np.asarray(value), err_msg=key)


def assert_trains(loss, backbone):
    """A finite loss whose gradient reaches the backbone's stem, finite everywhere."""
    assert math.isfinite(float(loss)), float(loss)
    loss.backward()
    trainable = [p for p in backbone.parameters() if not p.stop_gradient]
    stem = trainable[0]
    assert stem.grad is not None and float(stem.grad.abs().max()) > 0, stem.name
    # a norm of a stage that out_indices leaves out gets no gradient
    assert all(bool(np.isfinite(p.grad.numpy()).all()) for p in trainable if p.grad is not None)


def dummy_image(seed=0):
    import paddle

    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((1, 3, HEIGHT, WIDTH), dtype=np.float32))


# --- PaddleDetection -----------------------------------------------------------------------------

RETINANET_YAML = """\
architecture: RetinaNet
pretrain_weights: {weights}
num_classes: {num_classes}

RetinaNet:
  backbone: {backbone}
  neck: FPN
  head: RetinaHead

{backbone}:
  arch: {arch}
  out_indices: [1, 2, 3]

FPN:
  out_channel: 64
  extra_stage: 2
  has_extra_convs: true
  use_c5: false

RetinaHead:
  conv_feat:
    name: RetinaFeat
    feat_in: 64
    feat_out: 64
    num_convs: 1
    norm_type: null
    use_dcn: false
  anchor_generator:
    name: RetinaAnchorGenerator
    octave_base_scale: 4
    scales_per_octave: 3
    aspect_ratios: [0.5, 1.0, 2.0]
    strides: [8.0, 16.0, 32.0, 64.0, 128.0]
  bbox_assigner:
    name: MaxIoUAssigner
    positive_overlap: 0.5
    negative_overlap: 0.4
    allow_low_quality: true
  loss_class:
    name: FocalLoss
    gamma: 2.0
    alpha: 0.25
    loss_weight: 1.0
  loss_bbox:
    name: SmoothL1Loss
    beta: 0.0
    loss_weight: 1.0
  nms:
    name: MultiClassNMS
    nms_top_k: 1000
    keep_top_k: 100
    score_threshold: 0.05
    nms_threshold: 0.5
"""


@requires_ppdet
@pytest.mark.parametrize("backbone, arch", BACKBONES)
@pytest.mark.filterwarnings(r"ignore:Skip loading for (neck|head)\.")  # pretrain_weights hold the backbone only
def test_paddledetection_retinanet(backbone, arch, converted, tmp_path):
    import paddle
    from ppdet.core.workspace import create, load_config
    from ppdet.utils.checkpoint import load_pretrain_weight, match_state_dict

    import paddle_models.paddledet_backbones  # noqa: F401  (registers the backbones)

    weights = converted(arch)
    config = tmp_path / f"retinanet_{arch}.yml"
    config.write_text(RETINANET_YAML.format(weights=weights, num_classes=NUM_CLASSES, backbone=backbone, arch=arch))
    cfg = load_config(str(config))
    paddle.seed(0)
    model = create(cfg.architecture)
    assert type(model.backbone).__name__ == backbone
    assert [s.stride for s in model.backbone.out_shape] == [8, 16, 32]

    # ppdet's suffix matcher puts every converted key on backbone.<key> and nothing else
    file_state = paddle.load(str(weights))
    matched = match_state_dict(model.state_dict(), file_state)
    assert sorted(matched) == sorted(f"backbone.{k}" for k in file_state)
    load_pretrain_weight(model, cfg.pretrain_weights)  # what ppdet's Trainer does with pretrain_weights
    assert_backbone_holds(model.backbone, weights)

    image = dummy_image()
    inputs = {"image": image, "im_shape": paddle.to_tensor([[HEIGHT, WIDTH]], dtype="float32"),
              "scale_factor": paddle.to_tensor([[1.0, 1.0]], dtype="float32")}
    features = []
    model.backbone.register_forward_post_hook(lambda layer, args, outputs: features.append(outputs))
    model.eval()
    with paddle.no_grad():
        out = model(inputs)
    assert [tuple(f.shape) for f in features[0]] == [
        (1, s.channels, HEIGHT // s.stride, WIDTH // s.stride) for s in model.backbone.out_shape]
    assert out["bbox"].shape[-1] == 6 and int(out["bbox_num"].sum()) == out["bbox"].shape[0]

    model.train()
    inputs.update(gt_bbox=[paddle.to_tensor([[20.0, 30.0, 120.0, 150.0], [100.0, 40.0, 210.0, 150.0]])],
                  gt_class=[paddle.to_tensor([[1], [2]], dtype="int32")])
    losses = model(inputs)
    assert_trains(losses["loss"], model.backbone)


# --- PaddleSeg -----------------------------------------------------------------------------------

UPERNET_YAML = """\
batch_size: 1
iters: 1

train_dataset:
  type: Dataset
  dataset_root: {root}
  train_path: {root}/train.txt
  num_classes: {num_classes}
  mode: train
  transforms: []

model:
  type: UPerNet
  backbone:
    type: {backbone}
    arch: {arch}
    pretrained: {weights}
  backbone_indices: [0, 1, 2, 3]
  channels: 64
  enable_auxiliary_loss: true
  dropout_prob: 0.1

optimizer:
  type: AdamW
  weight_decay: 0.01

lr_scheduler:
  type: PolynomialDecay
  learning_rate: 0.0001
  end_lr: 0
  power: 1.0

loss:
  # top_k_percent_pixels < 1: PaddleSeg 2.8.0's plain CrossEntropyLoss (and OhemCrossEntropyLoss)
  # multiply a float32 tensor by an int64 one, which Paddle 3 refuses
  types:
    - type: CrossEntropyLoss
      top_k_percent_pixels: 0.9
    - type: CrossEntropyLoss
      top_k_percent_pixels: 0.9
  coef: [1, 0.4]
"""


@requires_paddleseg
@pytest.mark.parametrize("backbone, arch", BACKBONES)
def test_paddleseg_upernet(backbone, arch, converted, tmp_path):
    import paddle
    from paddleseg.core.train import loss_computation
    from paddleseg.cvlibs import Config, SegBuilder

    import paddle_models.paddleseg_backbones  # noqa: F401  (registers the backbones)

    weights = converted(arch)
    (tmp_path / "train.txt").write_text("")
    config = tmp_path / f"upernet_{arch}.yml"
    config.write_text(UPERNET_YAML.format(root=tmp_path, num_classes=NUM_CLASSES, backbone=backbone, arch=arch,
                                          weights=weights))
    builder = SegBuilder(Config(str(config)))
    paddle.seed(0)
    model = builder.model  # the backbone loads `pretrained` with paddleseg.utils.load_pretrained_model
    assert type(model.backbone).__name__ == backbone
    assert_backbone_holds(model.backbone, weights)

    image = dummy_image()
    features = []
    model.backbone.register_forward_post_hook(lambda layer, args, outputs: features.append(outputs))
    model.eval()
    with paddle.no_grad():
        logits = model(image)
    assert [tuple(f.shape) for f in features[0]] == [
        (1, info["channels"], HEIGHT // info["stride"], WIDTH // info["stride"]) for info in model.backbone.feature_info]
    assert model.backbone.feat_channels == [info["channels"] for info in model.backbone.feature_info]
    assert [tuple(t.shape) for t in logits] == [(1, NUM_CLASSES, HEIGHT, WIDTH)] * 2

    model.train()
    label = paddle.to_tensor(np.random.default_rng(1).integers(0, NUM_CLASSES, (1, HEIGHT, WIDTH)), dtype="int64")
    loss = sum(loss_computation(model(image), label, None, builder.loss))
    assert_trains(loss, model.backbone)
    builder.optimizer.step()  # the config's optimizer takes the step


@requires_ppdet
@requires_paddleseg
def test_wrong_arguments_say_what_is_accepted():
    from paddle_models import paddledet_backbones, paddleseg_backbones

    for module in (paddledet_backbones, paddleseg_backbones):
        with pytest.raises(ValueError, match="arch 'fcvit_b12_feat' is not a CrossFormer dense backbone; "
                                             "choose one of .*crossformer_small_det"):
            module.CrossFormer(arch="fcvit_b12_feat")
    with pytest.raises(ValueError, match="takes 3-channel"):
        paddleseg_backbones.FCViT(arch="fcvit_b12_feat", in_channels=4)


# --- without the suites --------------------------------------------------------------------------

@pytest.mark.parametrize("module, package", [("paddledet_backbones", "ppdet"), ("paddleseg_backbones", "paddleseg")])
def test_plugin_without_its_suite_fails_in_one_line(module, package):
    blocker = textwrap.dedent(f"""\
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == {package!r} or name.startswith({package!r} + "."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Block())
        """)
    code, _, err = run_python("-c", f"import paddle_models.{module}", sitecustomize=blocker)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("ImportError: paddle_models.") and f"No module named '{package}'" in last
    assert "pip install" in last and "--no-deps" in last
    assert "During handling" not in err
