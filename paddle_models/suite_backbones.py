"""What the PaddleDetection and PaddleSeg plug-ins share: a family's dense model, built by its
dense name, that checks each input's size against what the official dense code accepts."""
from __future__ import annotations

import importlib


def dense_model(family: str):
    """The family's Paddle dense model class (the plug-ins subclass it: same state-dict keys)."""
    return importlib.import_module(f"paddle_models.{family}").DENSE_MODEL


class DenseBackbone:
    """Mixed in before a family's dense model: ``arch`` picks the official dense configuration."""

    _family = ""  # the module name in paddle_models / model_configs

    def __init__(self, arch, out_indices=(0, 1, 2, 3), **kwargs):
        configs = importlib.import_module(f"model_configs.{self._family}").DENSE_CONFIGS
        if arch not in configs:
            raise ValueError(f"{type(self).__name__}: arch '{arch}' is not a {type(self).__name__} dense backbone; "
                             f"choose one of {', '.join(sorted(configs))}")
        super().__init__(configs[arch], out_indices=tuple(out_indices), **kwargs)
        self.arch = arch
        self.dense_config = configs[arch]

    def features(self, x) -> list:
        height, width = x.shape[-2:]
        if height > 0 and width > 0:  # -1 while tracing with a dynamic shape
            problem = self.dense_config.input_problem(height, width)
            if problem:
                raise ValueError(f"{self.arch}: {problem}")
        return list(super().forward(x))
