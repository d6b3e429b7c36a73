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


def make_official_checkpoint(name: str, path, *, seed: int = 0, container: Optional[str] = None,
                             prefix: str = "", img_size: Optional[int] = None, half: bool = False):
    """Build ``name``'s torch reference with seeded random weights and save it as the official
    code would (``container`` defaults to the entry the family's official loader reads;
    ``"raw"`` saves the bare state dict; a ``.safetensors`` path writes safetensors)."""
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
    container = container or spec.family.checkpoint_entries[0]
    if container == "raw":
        obj = state
    else:
        obj = {container: state, "epoch": 300}
    torch.save(obj, path)
    return path
