"""Official-format checkpoints with seeded random weights, for the demo, tests and
``verify --all`` when no real checkpoint is at hand.

Every floating tensor is perturbed around the model's own initialisation, scaled so that
norm affines, layer scales and biases are O(0.1) away from their init constants (so every
block and every tensor matters to the logits).  BatchNorm running statistics are first
measured on a seeded probe batch, as training would leave them, then perturbed: random
statistics that ignore the activations let deep residual stacks (BiFormer-S/B) drift to
logits of ~400, where one float32 rounding is already 2.4e-5 and no port could meet a 1e-5
gate; trained checkpoints do not look like that.  The state dict is then saved the way the
family's official code saves it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .registry import get_spec

CONTAINERS = ("raw", "model", "state_dict", "state_dict_ema", "model_ema")


def randomize_(model, seed: int = 0, input_size: int = 224):
    """Perturb every parameter and buffer of a torch model in place, deterministically."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            leaf = name.rpartition(".")[2]
            if not t.is_floating_point() or leaf in ("running_mean", "running_var"):
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if t.ndim >= 2 and float(t.std()) > 0:
                t.add_(noise * float(t.std()))  # weights: same spread as their init, new values
            else:
                t.add_(noise * 0.1)  # biases, norm affines, layer scales, small raw parameters
        _calibrate_batchnorm_(model, gen, input_size)
    return model


def _calibrate_batchnorm_(model, gen, input_size: int) -> None:
    """Running statistics measured on a seeded probe batch, then perturbed (mean by 0.1 std,
    variance by a factor in [0.75, 1.25]) so they are random, yet fit the activations."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives exactly its statistics
    probe = torch.randn((4, 3, input_size, input_size), generator=gen)
    model.train()
    try:
        model(probe)
    finally:
        model.eval()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    for m in norms:
        std = m.running_var.sqrt()
        m.running_mean.add_(0.1 * std * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.mul_(0.75 + 0.5 * torch.rand(m.running_var.shape, generator=gen))


# --- what sits beside a dense backbone in a released detector / segmentor file --------------------
# Key -> shape of the neck and heads, as the official configs build them (mmdet 2.x, mmseg 0.x,
# detectron2); the fixtures fill them with zeros: the converter must leave them out, not read them.

def _conv(name: str, out_ch: int, in_ch: int, k: int, bias: bool = True) -> dict:
    return {f"{name}.weight": (out_ch, in_ch, k, k), **({f"{name}.bias": (out_ch,)} if bias else {})}


def _batchnorm(name: str, ch: int) -> dict:
    return {f"{name}.{p}": (ch,) for p in ("weight", "bias", "running_mean", "running_var")} | {
        f"{name}.num_batches_tracked": ()}


def _linear(name: str, out_f: int, in_f: int) -> dict:
    return {f"{name}.weight": (out_f, in_f), f"{name}.bias": (out_f,)}


def _mmdet_fpn(channels, start: int = 0, extra: int = 0) -> dict:
    keys: dict = {}
    for i, ch in enumerate(channels[start:]):
        keys |= _conv(f"neck.lateral_convs.{i}.conv", 256, ch, 1)
    for i in range(len(channels) - start + extra):
        keys |= _conv(f"neck.fpn_convs.{i}.conv", 256, 256 if i < len(channels) - start else channels[-1], 3)
    return keys


def _mask_rcnn(channels) -> dict:  # mmdet Mask R-CNN 1x (FPN)
    keys = _mmdet_fpn(channels) | _conv("rpn_head.rpn_conv", 256, 256, 3)
    keys |= _conv("rpn_head.rpn_cls", 3, 256, 1) | _conv("rpn_head.rpn_reg", 12, 256, 1)
    keys |= _linear("roi_head.bbox_head.shared_fcs.0", 1024, 256 * 7 * 7)
    keys |= _linear("roi_head.bbox_head.shared_fcs.1", 1024, 1024)
    keys |= _linear("roi_head.bbox_head.fc_cls", 81, 1024) | _linear("roi_head.bbox_head.fc_reg", 320, 1024)
    for i in range(4):
        keys |= _conv(f"roi_head.mask_head.convs.{i}.conv", 256, 256, 3)
    return keys | _conv("roi_head.mask_head.upsample", 256, 256, 2) | _conv("roi_head.mask_head.conv_logits", 80, 256, 1)


def _retinanet(channels) -> dict:  # mmdet RetinaNet 1x: FPN from stage 2, two extra levels
    keys = _mmdet_fpn(channels, start=1, extra=2)
    for i in range(4):
        keys |= _conv(f"bbox_head.cls_convs.{i}.conv", 256, 256, 3) | _conv(f"bbox_head.reg_convs.{i}.conv", 256, 256, 3)
    return keys | _conv("bbox_head.retina_cls", 720, 256, 3) | _conv("bbox_head.retina_reg", 36, 256, 3)


def _upernet(channels) -> dict:  # mmseg UPerNet 160k (ADE20K, 150 classes) with an FCN auxiliary head
    keys: dict = {}
    for i in range(4):
        keys |= _conv(f"decode_head.psp_modules.{i}.1.conv", 512, channels[-1], 1, bias=False)
        keys |= _batchnorm(f"decode_head.psp_modules.{i}.1.bn", 512)
    keys |= _conv("decode_head.bottleneck.conv", 512, channels[-1] + 4 * 512, 3, bias=False)
    for i, ch in enumerate(channels[:-1]):
        keys |= _conv(f"decode_head.lateral_convs.{i}.conv", 512, ch, 1, bias=False)
        keys |= _conv(f"decode_head.fpn_convs.{i}.conv", 512, 512, 3, bias=False)
    keys |= _conv("decode_head.fpn_bottleneck.conv", 512, 4 * 512, 3, bias=False) | _conv("decode_head.conv_seg", 150, 512, 1)
    return keys | _conv("auxiliary_head.convs.0.conv", 256, channels[2], 3, bias=False) | _conv(
        "auxiliary_head.conv_seg", 150, 256, 1)


def _semantic_fpn(channels) -> dict:  # mmseg Semantic FPN 40k/80k (ADE20K)
    keys = _mmdet_fpn(channels)
    for level in range(4):
        for j in range(max(1, level)):
            keys |= _conv(f"decode_head.scale_heads.{level}.{2 * j}.conv", 128, 256 if j == 0 else 128, 3, bias=False)
            keys |= _batchnorm(f"decode_head.scale_heads.{level}.{2 * j}.bn", 128)
    return keys | _conv("decode_head.conv_seg", 150, 128, 1)


def _d2_mask_rcnn(channels) -> dict:  # detectron2 Mask R-CNN FPN 1x, around backbone.bottom_up
    keys: dict = {}
    for level, ch in enumerate(channels, start=2):
        keys |= _conv(f"backbone.fpn_lateral{level}", 256, ch, 1) | _conv(f"backbone.fpn_output{level}", 256, 256, 3)
    keys |= _conv("proposal_generator.rpn_head.conv", 256, 256, 3)
    keys |= _conv("proposal_generator.rpn_head.objectness_logits", 3, 256, 1)
    keys |= _conv("proposal_generator.rpn_head.anchor_deltas", 12, 256, 1)
    keys |= _linear("roi_heads.box_head.fc1", 1024, 256 * 7 * 7) | _linear("roi_heads.box_head.fc2", 1024, 1024)
    keys |= _linear("roi_heads.box_predictor.cls_score", 81, 1024) | _linear("roi_heads.box_predictor.bbox_pred", 320, 1024)
    for i in range(1, 5):
        keys |= _conv(f"roi_heads.mask_head.mask_fcn{i}", 256, 256, 3)
    return keys | _conv("roi_heads.mask_head.deconv", 256, 256, 2) | _conv("roi_heads.mask_head.predictor", 80, 256, 1)


DETECTOR_HEADS = {"mask_rcnn": _mask_rcnn, "retinanet": _retinanet, "upernet": _upernet,
                  "semantic_fpn": _semantic_fpn, "d2_mask_rcnn": _d2_mask_rcnn}


def detector_file(spec, backbone: dict) -> dict:
    """A dense backbone's state dict laid out as its released detector/segmentor file: the
    backbone under its prefix beside the neck and heads, in the framework's container."""
    import torch

    dense = spec.dense
    heads = {k: torch.zeros(shape, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
             for k, shape in DETECTOR_HEADS[dense.detector](dense.channels).items()}
    state = {dense.checkpoint_prefix + k: v for k, v in backbone.items()}
    if dense.framework == "detectron2":  # fvcore Checkpointer: the FPN's own keys come first
        return {"model": {**heads, **state}, "iteration": 89999}
    meta = {f"{dense.framework}_version": "2.x" if dense.framework == "mmdet" else "0.x", "epoch": 12,
            "iter": 87960, "CLASSES": ("person", "bicycle", "car"), "config": f"# {dense.config}\n"}
    return {"meta": meta, "state_dict": {**state, **heads},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "weight_decay": 1e-4, "params": [0, 1]}]}}


def make_official_checkpoint(name: str, path, *, seed: int = 0, container: Optional[str] = None,
                             prefix: str = "", img_size: Optional[int] = None, half: bool = False):
    """Build ``name``'s torch reference with seeded random weights and save it as the official
    code would (``container`` defaults to the entry the family's official loader reads;
    ``"raw"`` saves the bare state dict; a ``.safetensors`` path writes safetensors).  A dense
    backbone is saved inside its released detector/segmentor file (``container="detector"``, the
    default for them; any other container saves the bare backbone keys)."""
    import torch

    spec = get_spec(name)
    torch.manual_seed(seed)
    model = randomize_(spec.create_torch(img_size=img_size), seed, img_size or spec.preprocessing.input_size)
    state = {prefix + k: (v.half() if half and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    container = container or ("detector" if spec.dense else spec.checkpoint_entries[0])
    if container == "detector":
        obj = detector_file(spec, state)
    elif container == "raw":
        obj = state
    else:
        obj = {container: state, "epoch": 300}
    torch.save(obj, path)
    return path
