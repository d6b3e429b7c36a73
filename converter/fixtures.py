"""Official-format checkpoints with seeded random weights, for the demo, tests and
``verify --all`` when no real checkpoint is at hand.

Every floating tensor is perturbed around the model's own initialisation, scaled so that
norm affines, layer scales and biases are O(0.1) away from their init constants (so every
block and every tensor matters to the logits), and BatchNorm running statistics are
randomised too; then the state dict is saved the way the family's official code saves it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .registry import get_spec

CONTAINERS = ("raw", "model", "state_dict", "state_dict_ema", "model_ema")


def randomize_(model, seed: int = 0):
    """Perturb every parameter and buffer of a torch model in place, deterministically."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            leaf = name.rpartition(".")[2]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)  # U(0.5, 1.5)
            elif leaf == "running_mean":
                t.copy_(0.2 * noise)
            elif t.ndim >= 2 and float(t.std()) > 0:
                t.add_(noise * float(t.std()))  # weights: same spread as their init, new values
            else:
                t.add_(noise * 0.1)  # biases, norm affines, layer scales, small raw parameters
    return model


def make_official_checkpoint(name: str, path, *, seed: int = 0, container: Optional[str] = None,
                             prefix: str = "", img_size: Optional[int] = None, half: bool = False):
    """Build ``name``'s torch reference with seeded random weights and save it as the official
    code would (``container`` defaults to the entry the family's official loader reads;
    ``"raw"`` saves the bare state dict; a ``.safetensors`` path writes safetensors)."""
    import torch

    spec = get_spec(name)
    torch.manual_seed(seed)
    model = randomize_(spec.create_torch(img_size=img_size), seed)
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
